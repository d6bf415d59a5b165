"""Checkpoints that do not fit the quantized model fail loudly, in-process
and through the stock test scripts (the Runner itself only warns about
missing keys and would evaluate an unquantized model)."""
import os.path as osp
import pickle

import pytest
import torch
from mmengine.runner import Runner

from gplq_mm.engine.safe_checkpoint import (UnsafeCheckpointError,
                                            load_checkpoint_file)
from gplq_mm.models import CheckpointMismatchError
from gplq_test_utils import (CONFIGS, DEIT_FP32, DEIT_GPLQ, DET_GPLQ, REPO,
                             load_cfg, run_script, stock_script, tail, train)


def _drop_scales(src: dict, dst: str, n: int = 3):
    ck = dict(src)
    sd = dict(ck['state_dict'])
    keys = [k for k in sd if k.endswith('act_quant.scale')]
    dropped = [keys[0], keys[len(keys) // 2], keys[-1]][:n]
    for k in dropped:
        del sd[k]
    ck['state_dict'] = sd
    torch.save(ck, dst)
    return dropped


def test_partial_quantizer_state_raises_in_process(deit_stage1, tmp_path):
    bad = str(tmp_path / 'partial.pth')
    dropped = _drop_scales(deit_stage1.loaded, bad)
    cfg = load_cfg(DEIT_GPLQ, tmp_path / 'work', load_from=bad)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(CheckpointMismatchError) as err:
        runner.test()
    msg = str(err.value)
    assert 'the checkpoint has quantizer state but not for' in msg
    for k in dropped:
        assert k in msg


def test_partial_quantizer_state_fails_stock_test_py(det_stage1, tmp_path):
    bad = str(tmp_path / 'partial.pth')
    dropped = _drop_scales(det_stage1.loaded, bad)
    proc = run_script([stock_script('mmdet', 'test'),
                       osp.join(CONFIGS, DET_GPLQ), bad,
                       '--work-dir', str(tmp_path / 'work')], cwd=REPO)
    assert proc.returncode != 0, tail(proc)
    assert 'CheckpointMismatchError' in proc.stderr, tail(proc)
    for k in dropped:
        assert k in proc.stderr, tail(proc)
    assert 'Average Precision' not in proc.stdout  # nothing was evaluated


def test_fp32_checkpoint_with_stage1_config_raises_in_process(
        deit_fp32, tmp_path):
    """Testing an FP32 checkpoint with the stage-1 config: no calibration
    happens at test time, so the first quantizer refuses to run."""
    cfg = load_cfg(DEIT_GPLQ, tmp_path, load_from=deit_fp32[0])
    runner = Runner.from_cfg(cfg)
    with pytest.raises(RuntimeError, match='has no calibrated scale'):
        runner.test()


def test_fp32_checkpoint_with_stage1_config_fails_stock_test_py(
        det_fp32, tmp_path):
    proc = run_script([stock_script('mmdet', 'test'),
                       osp.join(CONFIGS, DET_GPLQ), det_fp32,
                       '--work-dir', str(tmp_path / 'work')], cwd=REPO)
    assert proc.returncode != 0, tail(proc)
    assert 'has no calibrated scale' in proc.stderr, tail(proc)
    assert 'backbone.patch_embed.projection.act_quant' in proc.stderr
    assert 'Average Precision' not in proc.stdout


def test_plain_mmengine_checkpoint_is_refused_until_converted(
        cls_root, tmp_path):
    """Why GPLQSafeCheckpointHook exists: a checkpoint written by a plain
    mmengine run holds HistoryBuffer/numpy objects that torch >= 2.6 refuses
    with weights_only=True; tools/convert_checkpoint.py --trust rewrites it."""
    cfg = load_cfg(DEIT_FP32, tmp_path / 'fp32')
    cfg.train_dataloader.dataset.indices = 4
    train(cfg)
    src = str(tmp_path / 'fp32' / 'epoch_1.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    with pytest.raises(UnsafeCheckpointError, match='--trust'):
        load_checkpoint_file(src)
    dst = str(tmp_path / 'fp32_safe.pth')
    proc = run_script([osp.join(REPO, 'tools', 'convert_checkpoint.py'), src,
                       dst, '--trust'], cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    safe = torch.load(dst, weights_only=True)
    orig = torch.load(src, weights_only=False)
    assert sorted(safe) == ['meta', 'state_dict']
    for k, v in orig['state_dict'].items():
        assert torch.equal(safe['state_dict'][k], v)
