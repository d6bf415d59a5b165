"""Stage-1 runs shared by the engine tests (each is a real Runner.train()).

Session scoped: the runs are reused read-only; tests that train further work
on copies.
"""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from gplq_test_utils import (DEIT_GPLQ, DET_GPLQ, Recorder, load_cfg,
                             log_text, save_fp32_checkpoint, train)


def _stage1(name: str, fp32: str, work_dir: str) -> SimpleNamespace:
    cfg = load_cfg(name, work_dir, load_from=fp32)
    rec = Recorder()
    runner = train(cfg, rec)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    out = SimpleNamespace(cfg_name=name, work_dir=work_dir, ckpt=ckpt,
                          fp32=fp32, rec=rec, log=log_text(work_dir),
                          loaded=torch.load(ckpt, weights_only=True))
    del runner
    return out


@pytest.fixture(scope='session')
def det_fp32(shapes_root, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('det_fp32') / 'fp32.pth')
    save_fp32_checkpoint(load_cfg(DET_GPLQ), path, seed=0)
    return path


@pytest.fixture(scope='session')
def det_stage1(det_fp32, tmp_path_factory):
    """Micro Mask R-CNN: calibration (2 batches) + 1 epoch (4 iterations)."""
    return _stage1(DET_GPLQ, det_fp32, str(tmp_path_factory.mktemp('det_s1')))


@pytest.fixture(scope='session')
def deit_fp32(cls_root, tmp_path_factory):
    """Two different FP32 DeiT checkpoints (A, B)."""
    d = tmp_path_factory.mktemp('deit_fp32')
    cfg = load_cfg(DEIT_GPLQ)
    paths = []
    for seed in (0, 1):
        paths.append(str(d / f'fp32_{seed}.pth'))
        save_fp32_checkpoint(cfg, paths[-1], seed=seed)
    return paths


@pytest.fixture(scope='session')
def deit_stage1(deit_fp32, tmp_path_factory):
    """Micro DeiT with PCA mimicking, from checkpoint A: calibration + 1 epoch
    (4 iterations)."""
    return _stage1(DEIT_GPLQ, deit_fp32[0],
                   str(tmp_path_factory.mktemp('deit_s1')))
