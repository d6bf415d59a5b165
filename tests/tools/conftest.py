"""Checkpoints and helpers for the command-line tests of tools/gplq_quantize.py.

Every tool run is a subprocess, exactly as a user types it.  Inputs are built
once per session in a temporary directory: generated data, FP32 checkpoints of
the micro fixtures of ``tests/configs`` (random initialisation: the tests
compare numbers between two ways of evaluating the same model, they do not
need a trained one) and W32A4 "stage-1" checkpoints (activation scales
calibrated in-process, as GPLQCalibrationHook does before Act-QAT).
"""
import copy
import os
import os.path as osp
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = osp.join(ROOT, 'tests', 'configs')
TOOL = osp.join(ROOT, 'tools', 'gplq_quantize.py')


def stock_tool(package: str, name: str) -> str:
    """<site-packages>/<package>/.mim/tools/<name>.py (shipped by the wheel)."""
    import importlib
    pkg = importlib.import_module(package)
    return osp.join(osp.dirname(pkg.__file__), '.mim', 'tools', f'{name}.py')


@dataclass
class Arch:
    """One micro architecture: its configs and checkpoints."""
    name: str
    plain_cfg: str  # FP32 mmdet/mmpretrain config
    stage1_cfg: str  # GPLQModel-wrapped config (W32A4)
    fp32_ckpt: str = ''
    w32a4_ckpt: str = ''
    num_train: int = 0


ARCHS = {
    'det': Arch('det', osp.join(CONFIGS, 'mask-rcnn_swin-micro_fpn_shapes.py'),
                osp.join(CONFIGS,
                         'gplq_mask-rcnn_swin-micro_fpn_shapes_w32a4.py')),
    'cls': Arch('cls', osp.join(CONFIGS, 'deit-micro_cls.py'),
                osp.join(CONFIGS, 'gplq_deit-micro_cls_w32a4.py')),
}


class Runs:
    """Runs commands in a subprocess and keeps their wall times."""

    def __init__(self, env):
        self.env = env
        self.times = []

    def __call__(self, argv, cwd, timeout=600) -> subprocess.CompletedProcess:
        t0 = time.time()
        proc = subprocess.run([sys.executable] + [str(a) for a in argv],
                              cwd=str(cwd), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        self.times.append((' '.join(osp.basename(str(a)) for a in argv[:2]),
                           time.time() - t0))
        return proc

    def quantize(self, *args, cwd) -> subprocess.CompletedProcess:
        return self(['-W', 'ignore', TOOL, *args], cwd)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, \
        f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc


def load_cfg(path: str):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    return cfg


def build(cfg):
    """The model of ``cfg`` as the Runner builds it."""
    from mmengine.registry import MODELS
    mc = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        mc.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    return MODELS.build(mc)


def save_ckpt(model, path: str) -> str:
    torch.save({'state_dict': {k: v.detach().clone()
                               for k, v in model.state_dict().items()},
                'meta': {}}, path)
    return path


def make_fp32(cfg_path: str, path: str, seed: int = 0, **backbone) -> str:
    """Randomly initialised FP32 checkpoint of a plain config."""
    cfg = load_cfg(cfg_path)
    cfg.model.backbone.update(backbone)
    torch.manual_seed(seed)
    return save_ckpt(build(cfg), path)


def make_w32a4(cfg_path: str, fp32: str, path: str, num_images: int = 4) -> str:
    """Stage-1 checkpoint: FP32 weights + calibrated activation scales."""
    from mmengine.runner import load_state_dict

    from gplq_mm.ptq.calib import build_calib_loader, calibrate_activations
    from gplq_mm.quant import QState
    cfg = load_cfg(cfg_path)
    cfg.model.mimic = dict(enabled=False)
    model = build(cfg)
    load_state_dict(model, torch.load(fp32, weights_only=True)['state_dict'])
    loader = build_calib_loader(cfg, num_images, 2, seed=0, pipeline='train')
    calibrate_activations(
        model, loader,
        lambda b: model(**model.data_preprocessor(b, False), mode='tensor'))
    model.set_quant_state(QState.LEARNING)
    return save_ckpt(model, path)


@pytest.fixture(scope='session')
def env(tmp_path_factory):
    """Generated data; the environment the subprocesses run in."""
    from gplq_mm.demo.data import make_classification, make_shapes_coco
    root = tmp_path_factory.mktemp('data')
    shapes, cls = str(root / 'shapes'), str(root / 'cls')
    make_shapes_coco(shapes, 8, 4, 64, seed=0)
    make_classification(cls, 20, 10, seed=0, source='generated', img_size=32)
    e = dict(os.environ, GPLQ_TEST_SHAPES=shapes + '/',
             GPLQ_TEST_CLS=cls + '/', PYTHONWARNINGS='ignore',
             OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    old = {k: os.environ.get(k) for k in ('GPLQ_TEST_SHAPES', 'GPLQ_TEST_CLS')}
    os.environ.update(GPLQ_TEST_SHAPES=e['GPLQ_TEST_SHAPES'],
                      GPLQ_TEST_CLS=e['GPLQ_TEST_CLS'])
    yield e
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope='session')
def runs(env, request):
    r = Runs(env)
    yield r
    if r.times:
        total = sum(t for _, t in r.times)
        lines = [f'{t:6.1f}s  {c}' for c, t in r.times]
        request.config._gplq_tool_times = (total, lines)


@pytest.fixture(scope='session')
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('ckpt')


@pytest.fixture(scope='session')
def arch(env, ckpt_dir):
    """``arch[name]``: configs and FP32 / W32A4 checkpoints (built lazily)."""

    class Lazy(dict):

        def __missing__(self, name):
            a = copy.copy(ARCHS[name])
            a.fp32_ckpt = make_fp32(a.plain_cfg, str(ckpt_dir / f'{name}_fp32.pth'))
            a.w32a4_ckpt = make_w32a4(a.stage1_cfg, a.fp32_ckpt,
                                      str(ckpt_dir / f'{name}_w32a4.pth'))
            self[name] = a
            return a

    return Lazy()


def pytest_terminal_summary(terminalreporter, config):
    times = getattr(config, '_gplq_tool_times', None)
    if times:
        total, lines = times
        terminalreporter.write_line(
            f'tests/tools: {len(lines)} subprocess runs, {total:.0f}s:')
        for line in lines:
            terminalreporter.write_line('  ' + line)
