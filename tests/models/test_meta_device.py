"""No tensor on an implicit device: the W32A4 and W4A4 models build under
``torch.device('meta')`` with every parameter and buffer there (a tensor
made with an explicit ``device='cpu'``, or copied from a CPU constant, would
land on the CPU instead).  Users build on CUDA the same way.

(mmdet's SwinTransformer cannot be built on meta at all: its constructor
calls ``.item()`` on a drop-path ``linspace``, so the detector is covered by
the CPU/CUDA device tests of tests/tools/test_gplq_quantize.py.)"""
import os.path as osp

import pytest
import torch
from gplq_test_utils import CONFIGS, DEIT_GPLQ, build, load_cfg


@pytest.mark.parametrize('w4a4', [False, True])
def test_deit_builds_on_meta(w4a4):
    cfg = load_cfg(osp.join(CONFIGS, DEIT_GPLQ))
    if w4a4:
        cfg.model.w4a4 = dict(w_bits=4, qwt_blocks=['backbone.layers.0'],
                              fold='pow2')
    with torch.device('meta'):
        model = build(cfg)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    off = [n for n, t in tensors.items() if t.device.type != 'meta']
    assert not off, off[:5]
    names = list(tensors)
    if w4a4:  # the integer structure was built, QwT included
        assert any(n.endswith('.weight_packed') for n in names)
        assert any('qwt' in n for n in names)
    else:
        assert any(n.endswith('act_quant.scale') for n in names)
