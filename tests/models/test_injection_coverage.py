"""Quantizer injection on real (micro) mmdet / mmpretrain models.

Every intended layer is wrapped and nothing else: compared module by module
with the float model built from the same config.
"""
import os.path as osp
import re

import mmdet
import pytest
import torch
from mmcv.cnn.bricks import wrappers
from mmengine.config import Config
from torch import nn

from gplq_mm.models.attention import attention_classes, is_quant_attention
from gplq_mm.models.checkpoint_keys import QUANT_KEY
from gplq_mm.quant import (ActQuantizer, QConv2d, QLinear, iter_act_quantizers,
                           set_act_state)
from gplq_test_utils import (DEIT_GPLQ, DET_GPLQ, SWIN_CLS_GPLQ, build,
                             fp32_model_cfg, load_cfg)

QUANT_CHILD = re.compile(r'\.(act|q|k|v|attn|weight)_quant$')
# layers whose forward is exactly nn.Linear's / nn.Conv2d's (mmcv's wrappers
# only special-case empty inputs on torch < 1.5)
LINEAR = (nn.Linear, wrappers.Linear)
CONV = (nn.Conv2d, wrappers.Conv2d)


def _targets(fp32: nn.Module, prefix: str = ''):
    attn_types = tuple(attention_classes())
    lin, conv, attn, convt = set(), set(), set(), set()
    for n, m in fp32.named_modules():
        if not n.startswith(prefix):
            continue
        if isinstance(m, attn_types):
            attn.add(n)
        elif type(m) in LINEAR:
            lin.add(n)
        elif type(m) in CONV:
            conv.add(n)
        elif isinstance(m, nn.ConvTranspose2d):
            convt.add(n)
    return lin, conv, attn, convt


def _check(fp32: nn.Module, wrapper, scope_prefix: str, first: str,
           token_count: int):
    inner = wrapper.model
    lin, conv, attn, convt = _targets(fp32, scope_prefix)
    assert lin and conv and attn
    # 1. every target is wrapped
    for n in lin:
        assert type(inner.get_submodule(n)) is QLinear, n
    for n in conv:
        assert type(inner.get_submodule(n)) is QConv2d, n
    for n in attn:
        assert is_quant_attention(inner.get_submodule(n)), n
    for n in convt:  # no quantized ConvTranspose2d: left float, reported
        assert type(inner.get_submodule(n)) is type(fp32.get_submodule(n))
        assert not hasattr(inner.get_submodule(n), 'act_quant')
    assert {n for n, _ in wrapper.report.left_float} >= convt
    # 2. nothing else: same module tree apart from the added quantizers, same
    # types apart from the wrapped ones
    q_names = {n for n, _ in inner.named_modules() if not QUANT_CHILD.search(n)
               and '_quant.' not in n}
    assert q_names == {n for n, _ in fp32.named_modules()}
    for n, m in fp32.named_modules():
        if n not in lin | conv | attn:
            assert type(inner.get_submodule(n)) is type(m), n
    wrapped = {n for n, m in inner.named_modules()
               if isinstance(m, (QLinear, QConv2d)) or is_quant_attention(m)}
    assert wrapped == lin | conv | attn
    assert len(wrapper.report.records) == len(wrapped)
    # 3. bit widths / granularities
    for n in lin | conv:
        aq = inner.get_submodule(n).act_quant
        assert aq.cfg.bits == (8 if n == first else 4), n
        assert aq.cfg.granularity == 'per_channel'
        mod = inner.get_submodule(n)
        chans = mod.in_features if n in lin else mod.in_channels
        assert aq.num_channels == chans
        assert inner.get_submodule(n).weight_quant is None  # W32
    for n in attn:
        a = inner.get_submodule(n)
        for q in (a.q_quant, a.k_quant, a.v_quant):
            assert q.cfg.bits == 4 and q.cfg.granularity == 'per_token'
            assert q.num_channels == token_count
        assert a.attn_quant.cfg.kind == 'log2'
    # 4. the parameters are the float model's (names, shapes), plus quantizers
    f_keys = {f'model.{k}': v.shape for k, v in fp32.state_dict().items()}
    q_sd = wrapper.state_dict()
    assert {k: v.shape for k, v in q_sd.items()
            if not QUANT_KEY.search(k)} == f_keys
    n_quant = sum(isinstance(m, ActQuantizer) for m in inner.modules())
    assert n_quant == len(lin) + len(conv) + 4 * len(attn)
    assert sum(1 for k in q_sd if k.endswith('.scale')
               and QUANT_KEY.search(k)) == n_quant


@pytest.mark.parametrize('scope', ['whole', 'backbone'])
def test_det_swin_mask_rcnn(scope, shapes_root):
    cfg = load_cfg(DET_GPLQ)
    cfg.model.quant.scope = scope
    fp32 = build(cfg, fp32_model_cfg(cfg))
    wrapper = build(cfg)
    prefix = 'backbone.' if scope == 'backbone' else ''
    # window 4x4 = 16 tokens per window
    _check(fp32, wrapper, prefix, 'backbone.patch_embed.projection', 16)
    if scope == 'backbone':
        for n, m in wrapper.model.named_modules():
            if not n.startswith('backbone') and n:
                assert not isinstance(m, (QLinear, QConv2d, ActQuantizer)), n
        assert type(wrapper.model.neck.lateral_convs[0].conv) is nn.Conv2d
        assert type(wrapper.model.roi_head.bbox_head.fc_cls) is nn.Linear
    else:
        # detector heads included (RepQ-ViT protocol), incl. the mask head
        assert type(wrapper.model.roi_head.mask_head.conv_logits) is QConv2d
        assert type(wrapper.model.rpn_head.rpn_conv) is QConv2d


@pytest.mark.parametrize('name,tokens', [(DEIT_GPLQ, 17), (SWIN_CLS_GPLQ, 16)])
def test_classifiers(name, tokens, cls_root):
    # DeiT: (32/8)^2 patches + cls token; Swin: 4x4 windows
    cfg = load_cfg(name)
    fp32 = build(cfg, fp32_model_cfg(cfg))
    wrapper = build(cfg)
    _check(fp32, wrapper, '', 'backbone.patch_embed.projection', tokens)
    assert type(wrapper.model.head.layers.head if hasattr(
        wrapper.model.head, 'layers') else wrapper.model.head.fc) is QLinear


def _resnet_mask_rcnn_cfg(**backbone) -> Config:
    cfg = Config.fromfile(
        osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'mask_rcnn',
                 'mask-rcnn_r50_fpn_1x_coco.py'))
    m = cfg.model
    m.backbone.update(depth=18, init_cfg=None, **backbone)
    m.neck.in_channels = [64, 128, 256, 512]
    m.roi_head.bbox_head.fc_out_channels = 64
    m.test_cfg.rpn.update(nms_pre=100, max_per_img=20)
    return cfg


def test_unknown_backbone_raises_and_generic_works():
    cfg = _resnet_mask_rcnn_cfg()
    wrap = dict(type='GPLQModel', model=cfg.model)
    with pytest.raises(ValueError) as err:
        build(cfg, wrap)
    msg = str(err.value)
    assert 'mmdet.models.backbones.resnet.ResNet' in msg
    for supported in ('mmdet.models.backbones.swin.SwinTransformer',
                      'mmpretrain.models.backbones.swin_transformer.'
                      'SwinTransformer',
                      'mmpretrain.models.backbones.vision_transformer.'
                      'VisionTransformer'):
        assert supported in msg
    assert 'generic=True' in msg

    fp32 = build(cfg, cfg.model)
    wrapper = build(cfg, dict(wrap, quant=dict(generic=True)))
    inner = wrapper.model
    lin, conv, _, convt = _targets(fp32)
    for n in lin:
        assert type(inner.get_submodule(n)) is QLinear, n
    for n in conv:
        assert type(inner.get_submodule(n)) is QConv2d, n
    assert convt and all(type(inner.get_submodule(n)) is wrappers.
                         ConvTranspose2d for n in convt)
    assert not any(is_quant_attention(m) for m in inner.modules())
    assert inner.backbone.conv1.act_quant.cfg.bits == 8  # the image input
    assert inner.backbone.layer1[0].conv1.act_quant.cfg.bits == 4
    assert len(wrapper.report.records) == len(lin) + len(conv)

    # and it runs: calibrate on a batch, then a quantized forward
    from mmdet.structures import DetDataSample
    meta = dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                batch_input_shape=(64, 64), scale_factor=(1.0, 1.0))
    x = torch.randn(2, 3, 64, 64)
    samples = [DetDataSample(metainfo=meta) for _ in range(2)]
    wrapper.eval()
    with torch.no_grad():
        set_act_state(wrapper, 'calibrating')
        ref = wrapper(x, samples, mode='tensor')
        for _, q in iter_act_quantizers(wrapper):
            q.finish_calibration()
        assert wrapper.all_calibrated()
        out = wrapper(x, samples, mode='tensor')
    flat = [t for t in torch.utils._pytree.tree_leaves(out)
            if torch.is_tensor(t)]
    assert len(flat) == len([t for t in torch.utils._pytree.tree_leaves(ref)
                             if torch.is_tensor(t)])
    assert all(bool(torch.isfinite(t).all()) for t in flat)


def test_conv_subclasses_with_own_forward_stay_float():
    """Weight-standardized convs (mmcv ConvWS2d) would lose the
    standardization inside a QConv2d: they are left float and reported."""
    cfg = _resnet_mask_rcnn_cfg(conv_cfg=dict(type='ConvWS'))
    wrapper = build(cfg, dict(type='GPLQModel', model=cfg.model,
                              quant=dict(generic=True)))
    ws = [n for n, m in wrapper.model.named_modules()
          if type(m).__name__ == 'ConvWS2d']
    assert ws and 'backbone.layer1.0.conv1' in ws
    left = dict(wrapper.report.left_float)
    for n in ws:
        assert left[n] == 'ConvWS2d has its own forward'
    # the plain convs around them are quantized
    assert type(wrapper.model.neck.lateral_convs[0].conv) is QConv2d


def test_act_overrides_change_only_the_matching_layers(cls_root):
    """quant.act_overrides: per-layer input quantizer fields by regex, e.g. an
    unsigned grid (codes 0..15) for the post-GELU fc2 inputs."""
    cfg = load_cfg(DEIT_GPLQ)
    cfg.model.quant['act_overrides'] = {r'ffn\.layers\.1$': dict(signed=False)}
    wrapper = build(cfg)
    fc2 = {n: m for n, m in wrapper.model.named_modules()
           if isinstance(m, QLinear) and re.search(r'ffn\.layers\.1$', n)}
    others = [m for n, m in wrapper.model.named_modules()
              if isinstance(m, QLinear) and n not in fc2]
    assert fc2 and others
    for m in fc2.values():
        cfg_q = m.act_quant.cfg
        assert (cfg_q.signed, cfg_q.qmin, cfg_q.qmax) == (False, 0, 15)
        # the rest of the default is kept
        assert (cfg_q.observer, cfg_q.percentile) == ('percentile', (0.1, 99.9))
    assert all(m.act_quant.cfg.signed for m in others)


@pytest.mark.parametrize('overrides,match', [
    ({'(': dict(signed=False)}, 'not a regex'),
    ({'fc': dict(sign=False)}, 'unknown keys'),
    ([('fc', dict(signed=False))], 'must be a dict'),
])
def test_act_overrides_bad_input(overrides, match):
    from gplq_mm.models.injection import InjectConfig
    with pytest.raises((ValueError, TypeError), match=match):
        InjectConfig.from_dict(dict(act_overrides=overrides))
