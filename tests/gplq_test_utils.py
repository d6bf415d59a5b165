"""Helpers of the OpenMMLab-side tests (tests/models, tests/engine).

Everything runs the real stack: configs under ``tests/configs`` inherit the
official mmdet/mmpretrain configs and only shrink sizes; data come from
``gplq_mm.demo.data`` (see the session fixtures in ``tests/conftest.py``).
"""
import copy
import glob
import itertools
import json
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, List, Optional

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import MODELS, DefaultScope

TESTS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(TESTS)
CONFIGS = osp.join(TESTS, 'configs')
DET_FP32 = 'mask-rcnn_swin-micro_fpn_shapes.py'
DET_GPLQ = 'gplq_mask-rcnn_swin-micro_fpn_shapes_w32a4.py'
DEIT_FP32 = 'deit-micro_cls.py'
DEIT_GPLQ = 'gplq_deit-micro_cls_w32a4.py'
SWIN_CLS_FP32 = 'swin-micro_cls.py'
SWIN_CLS_GPLQ = 'gplq_swin-micro_cls_w32a4.py'

_counter = itertools.count()


def stock_script(pkg: str, which: str) -> str:
    """``<site-packages>/<pkg>/.mim/tools/<which>.py`` (in the wheel)."""
    mod = __import__(pkg)
    path = osp.join(osp.dirname(mod.__file__), '.mim', 'tools', f'{which}.py')
    assert osp.isfile(path), f'{pkg} does not ship {path}'
    return path


def load_cfg(name: str, work_dir: Optional[str] = None, **options) -> Config:
    """A test config, with a unique experiment/visualizer name.

    mmengine keys loggers, message hubs and visualizers by these names; two
    Runners built in the same second from the same config would share them.
    ``options`` are ``--cfg-options``-style updates (dotted keys allowed).
    """
    cfg = Config.fromfile(osp.join(CONFIGS, name))
    uid = f'{osp.splitext(name)[0]}_{os.getpid()}_{next(_counter)}'
    cfg.experiment_name = uid
    if cfg.get('visualizer') is not None:
        cfg.visualizer['name'] = uid
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    if options:
        cfg.merge_from_dict(options)
    return cfg


def fp32_model_cfg(cfg: Config) -> dict:
    """Config of the plain model, with the top-level data_preprocessor merged
    the way the Runner merges it."""
    mc = copy.deepcopy(cfg.get('fp32_model', cfg.model))
    if cfg.get('data_preprocessor') is not None:
        mc.setdefault('data_preprocessor',
                      copy.deepcopy(cfg.data_preprocessor))
    return mc


def build(cfg: Config, model_cfg: Optional[dict] = None, seed: int = 0):
    """Build ``model_cfg`` (default: the config's GPLQ/plain model) in the
    config's default scope, with the torch RNG seeded."""
    if model_cfg is None:
        model_cfg = copy.deepcopy(cfg.model)
        if cfg.get('data_preprocessor') is not None:
            model_cfg.setdefault('data_preprocessor',
                                 copy.deepcopy(cfg.data_preprocessor))
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(model_cfg)


def save_fp32_checkpoint(cfg: Config, path: str, seed: int = 0) -> Dict:
    """A plain (FP32, unwrapped) model's checkpoint, as users have them."""
    model = build(cfg, fp32_model_cfg(cfg), seed=seed)
    sd = model.state_dict()
    torch.save({'state_dict': sd, 'meta': {}}, path)
    return sd


def act_quantizers(model):
    """``(name, quantizer)`` of every activation quantizer, names relative to
    the GPLQModel (``model.backbone....``, as in its state dict)."""
    from gplq_mm.quant import iter_act_quantizers
    return list(iter_act_quantizers(getattr(model, 'module', model)))


def act_scales(model) -> Dict[str, torch.Tensor]:
    """``{quantizer name: scale}`` of every activation quantizer (copies)."""
    return {n: m.scale.detach().clone() for n, m in act_quantizers(model)}


def ckpt_scales(ckpt: dict) -> Dict[str, torch.Tensor]:
    """Scales stored in a checkpoint dict, keyed like :func:`act_scales`."""
    sd = ckpt['state_dict']
    return {k[:-len('.scale')]: v for k, v in sd.items()
            if re.search(r'(act|q|k|v|attn)_quant\.scale$', k)}


class Recorder(Hook):
    """Records what tests need while a real Runner trains.

    Registered with priority LOW, so ``before_train`` sees the model after
    ``GPLQCalibrationHook`` (priority HIGH) calibrated it.
    """

    def __init__(self):
        self.calibrated = None  # scales at before_train (after calibration)
        self.first_iter_scales = None
        self.outputs: List[dict] = []
        self.teacher_before = self.teacher_after = None
        self.param_groups = None
        self.loaded_state = None
        self.pca = None

    def _model(self, runner):
        return getattr(runner.model, 'module', runner.model)

    def before_train(self, runner) -> None:
        from gplq_mm.quant import iter_act_quantizers
        model = self._model(runner)
        self.calibrated = act_scales(model)
        self.initialized = {n: bool(m.initialized)
                            for n, m in iter_act_quantizers(model.model)}
        self.loaded_state = {k: v.detach().clone()
                             for k, v in model.state_dict().items()}
        self.scale_params = {n: (id(m.scale), m.scale.requires_grad)
                             for n, m in act_quantizers(model)}
        self.param_groups = [
            dict(ids={id(p) for p in g['params']},
                 weight_decay=g.get('weight_decay'), lr=g.get('lr'))
            for g in runner.optim_wrapper.optimizer.param_groups]
        self.message_hub_scalars = copy.deepcopy(
            dict(runner.message_hub.log_scalars))
        if model.teacher is not None:
            self.teacher_before = {k: v.detach().clone() for k, v in
                                   model.teacher.state_dict().items()}
            self.teacher_param_ids = {
                id(p) for p in model.teacher.parameters()}
            self.pca = tuple(t.detach().clone() for t in model.pca)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.outputs.append(
            {k: float(v.detach()) if torch.is_tensor(v) else float(v)
             for k, v in (outputs or {}).items()})
        if self.first_iter_scales is None:
            self.first_iter_scales = act_scales(self._model(runner))

    def after_train(self, runner) -> None:
        model = self._model(runner)
        if model.teacher is not None:
            self.teacher_after = {k: v.detach().clone() for k, v in
                                  model.teacher.state_dict().items()}
        self.after_train_scales = act_scales(model)
        self.final_scalars = dict(runner.message_hub.log_scalars)
        self.epoch, self.iter = runner.epoch, runner.iter


def train(cfg: Config, recorder: Optional[Recorder] = None):
    """``Runner.from_cfg(cfg).train()`` with an optional :class:`Recorder`."""
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    if recorder is not None:
        runner.register_hook(recorder, priority='LOW')
    runner.train()
    return runner


def log_text(work_dir: str) -> str:
    """Text of the newest mmengine log file under ``work_dir``."""
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.log')),
                  key=osp.getmtime)
    assert logs, f'no log under {work_dir}'
    with open(logs[-1]) as f:
        return f.read()


def run_script(args: List[str], cwd: str, timeout: int = 600,
               env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``python args...`` as a user would (inherits GPLQ_TEST_* vars)."""
    full_env = dict(os.environ)
    full_env.setdefault('PYTHONWARNINGS', 'ignore')
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable] + list(args), cwd=cwd,
                          env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (f'exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-n:]}\n'
            f'--- stderr ---\n{proc.stderr[-n:]}')


def last_metrics(text: str, prefix: str) -> Dict[str, float]:
    """The last ``prefix/name: value`` metrics line mmengine logged."""
    found = {}
    for line in text.splitlines():
        pairs = re.findall(rf'({re.escape(prefix)}/\w+): (-?[\d.]+)', line)
        if pairs:
            found = {k: float(v) for k, v in pairs}
    return found


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# -- bad data (tests of docs/reliability.md) ---------------------------------
NAN_MODULE = 'gplq_test_nan'
_NAN_SOURCE = '''"""Test-only transform: images become float32; the one whose path ends
with ``suffix`` gets a NaN pixel (as a corrupt float image would)."""
import numpy as np
from mmengine.registry import TRANSFORMS


@TRANSFORMS.register_module(force=True)
class GPLQTestNaNImage:

    def __init__(self, suffix):
        self.suffix = suffix

    def __call__(self, results):
        img = results['img'].astype(np.float32)
        if results['img_path'].endswith(self.suffix):
            img[0, 0] = np.nan
        results['img'] = img
        return results
'''


def write_nan_config(directory, base: str, suffix: str, img_size: int = 32
                     ) -> str:
    """A config inheriting ``tests/configs/<base>`` (a classifier) whose
    train and test pipelines put a NaN pixel into the image ``*suffix``.
    Writes the transform module next to it: run with PYTHONPATH=directory."""
    directory = str(directory)
    with open(osp.join(directory, f'{NAN_MODULE}.py'), 'w') as f:
        f.write(_NAN_SOURCE)
    path = osp.join(directory, f'nan_{osp.basename(base)}')
    with open(path, 'w') as f:
        f.write(
            f'_base_ = {osp.join(CONFIGS, base)!r}\n'
            f"custom_imports = dict(imports=['gplq_mm', {NAN_MODULE!r}], "
            'allow_failed_imports=False)\n'
            "nan_pipeline = [dict(type='LoadImageFromFile'),\n"
            f"    dict(type='GPLQTestNaNImage', suffix={suffix!r}),\n"
            f"    dict(type='Resize', scale=({img_size}, {img_size})),\n"
            "    dict(type='PackInputs')]\n"
            'train_dataloader = dict(dataset=dict(pipeline=nan_pipeline))\n'
            'val_dataloader = dict(dataset=dict(pipeline=nan_pipeline))\n'
            'test_dataloader = val_dataloader\n')
    return path


def train_images(root: str) -> List[str]:
    """Training images of a classification set, in CustomDataset order."""
    train = osp.join(root, 'train')
    return [osp.join(train, c, f) for c in sorted(os.listdir(train))
            for f in sorted(os.listdir(osp.join(train, c)))]


def copy_with_black_image(src_root: str, dst_root: str, index: int) -> str:
    """Copy a classification set (folder per class) and overwrite training
    image number ``index`` (in mmpretrain's CustomDataset order: sorted
    classes, sorted files) with an all-zero image of the same size.
    Returns that image's path."""
    import shutil

    import cv2
    import numpy as np
    shutil.copytree(src_root, dst_root)
    path = train_images(dst_root)[index]
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert cv2.imwrite(path, np.zeros_like(img))
    return path


def first_shuffled_index(n: int, seed: int) -> int:
    """The first index mmengine's ``DefaultSampler(shuffle=True, seed)``
    yields in epoch 0 for a dataset of ``n`` items."""
    from mmengine.dataset import DefaultSampler
    return next(iter(DefaultSampler(list(range(n)), shuffle=True,
                                    seed=seed)))
