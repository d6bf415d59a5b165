"""Checkpoints and helpers for the command-line tests of tools/gplq_quantize.py.

Every tool run is a subprocess, exactly as a user types it.  Inputs are built
once per session: FP32 checkpoints of the micro fixtures of ``tests/configs``
(random initialisation: the tests compare two ways of evaluating the same
model, they need no trained one) and W32A4 "stage-1" checkpoints (activation
scales calibrated in-process on training images, as GPLQCalibrationHook does
before Act-QAT).  Data: the session datasets of ``tests/conftest.py``.
"""
import os.path as osp
import time
from dataclasses import dataclass

import pytest
import torch
from gplq_test_utils import (CONFIGS, DEIT_FP32, DEIT_GPLQ, DET_FP32,
                             DET_GPLQ, REPO, build, load_cfg, run_script,
                             save_fp32_checkpoint)

TOOL = osp.join(REPO, 'tools', 'gplq_quantize.py')


@dataclass
class Arch:
    """One micro architecture: its configs and checkpoints."""
    name: str
    plain_cfg: str  # FP32 mmdet/mmpretrain config (absolute path)
    stage1_cfg: str  # GPLQModel-wrapped config (W32A4)
    package: str  # mmdet / mmpretrain: whose stock tools/test.py evaluates it
    fp32_ckpt: str = ''
    w32a4_ckpt: str = ''


def make_w32a4(stage1_cfg: str, fp32_ckpt: str, path: str, num_images: int = 4,
               **options) -> str:
    """Stage-1 checkpoint: FP32 weights + calibrated activation scales."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import load_state_dict

    from gplq_mm.ptq.calib import build_calib_loader, calibrate_activations
    from gplq_mm.quant import QState, set_act_state
    cfg = load_cfg(stage1_cfg, **options)
    cfg.model.mimic = dict(enabled=False)
    model = build(cfg)
    load_state_dict(model, torch.load(fp32_ckpt, weights_only=True)
                    ['state_dict'])
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        loader = build_calib_loader(cfg, num_images, 2, seed=0,
                                    pipeline='train')
        calibrate_activations(
            model, loader,
            lambda b: model(**model.data_preprocessor(b, False), mode='tensor'))
    set_act_state(model, QState.LEARNING)
    assert model.all_calibrated()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


def make_arch(name: str, directory, **options) -> Arch:
    """FP32 + W32A4 checkpoints of ``name`` ('det' or 'cls'); ``options``
    (dotted keys of the plain model, e.g. ``backbone.arch.embed_dims``) give
    another model size."""
    plain, stage1, pkg = dict(
        det=(DET_FP32, DET_GPLQ, 'mmdet'),
        cls=(DEIT_FP32, DEIT_GPLQ, 'mmpretrain'))[name]
    a = Arch(name, osp.join(CONFIGS, plain), osp.join(CONFIGS, stage1), pkg)
    tag = name + ''.join(f'_{v}' for v in options.values())
    a.fp32_ckpt = str(directory / f'{tag}_fp32.pth')
    save_fp32_checkpoint(load_cfg(plain, **{f'model.{k}': v for k, v in
                                            options.items()}), a.fp32_ckpt)
    a.w32a4_ckpt = make_w32a4(
        stage1, a.fp32_ckpt, str(directory / f'{tag}_w32a4.pth'),
        **{f'model.model.{k}': v for k, v in options.items()})
    return a


@pytest.fixture(scope='session', name='make_arch')
def make_arch_fixture(shapes_root, cls_root):
    """:func:`make_arch` (with the session datasets in place)."""
    return make_arch


@pytest.fixture(scope='session')
def arch(shapes_root, cls_root, tmp_path_factory):
    """``arch['det' | 'cls']``: configs and checkpoints, built on first use."""
    directory = tmp_path_factory.mktemp('ckpt')

    class Lazy(dict):

        def __missing__(self, name):
            self[name] = make_arch(name, directory)
            return self[name]

    return Lazy()


class Runs:
    """Subprocess runs of the session, with their wall times."""

    def __init__(self):
        self.times = []

    def __call__(self, args, cwd, timeout=600):
        t0 = time.time()
        proc = run_script([str(a) for a in args], cwd=str(cwd),
                          timeout=timeout)
        self.times.append((f'{osp.basename(str(args[0]))} '
                           f'{osp.basename(str(args[1]))}', time.time() - t0))
        return proc

    def quantize(self, *args, cwd):
        return self([TOOL, *args], cwd)


@pytest.fixture(scope='session')
def runs(request):
    r = Runs()
    yield r
    request.config._gplq_tool_times = r.times


def pytest_terminal_summary(terminalreporter, config):
    times = getattr(config, '_gplq_tool_times', None)
    if times:
        terminalreporter.write_line(
            f'tests/tools: {len(times)} subprocess runs, '
            f'{sum(t for _, t in times):.0f}s in total')
        for cmd, t in times:
            terminalreporter.write_line(f'  {t:6.1f}s  {cmd}')


@pytest.fixture(scope='session')
def cls_w4a4(arch, runs, tmp_path_factory):
    """W4A4 config + checkpoint of the micro DeiT, written by
    ``gplq_quantize.py`` (4 calibration images, --no-qwt)."""
    from types import SimpleNamespace

    from gplq_test_utils import tail
    a = arch['cls']
    out = tmp_path_factory.mktemp('cls_w4a4')
    proc = runs.quantize(a.stage1_cfg, a.w32a4_ckpt, '--out-dir', out,
                         '--calib-images', 4, '--no-qwt', cwd=out)
    assert proc.returncode == 0, tail(proc)
    base = str(out / 'gplq_deit-micro_cls_w32a4_w4a4')
    return SimpleNamespace(arch=a, cfg=base + '.py', ckpt=base + '.pth',
                           report=base + '.json')


@pytest.fixture(scope='session')
def det_w4a4(arch, runs, tmp_path_factory):
    """W4A4 config + checkpoint of the micro Mask R-CNN Swin, written by
    ``gplq_quantize.py`` (4 calibration images, QwT)."""
    from types import SimpleNamespace

    from gplq_test_utils import tail
    a = arch['det']
    out = tmp_path_factory.mktemp('det_w4a4')
    proc = runs.quantize(a.stage1_cfg, a.w32a4_ckpt, '--out-dir', out,
                         '--calib-images', 4, '--batch-size', 2, cwd=out)
    assert proc.returncode == 0, tail(proc)
    base = str(out / osp.splitext(osp.basename(a.stage1_cfg))[0]) + '_w4a4'
    return SimpleNamespace(arch=a, cfg=base + '.py', ckpt=base + '.pth',
                           report=base + '.json')
