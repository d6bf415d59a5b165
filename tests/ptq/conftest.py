"""Tiny real models for the stage-2 tests: calibrated W32A4 and converted W4A4.

The models are the micro fixtures of ``tests/configs`` (mmdet Swin Mask R-CNN
at 64 px, mmpretrain DeiT at 32 px) on the session datasets of
``tests/conftest.py``.  Activation scales are calibrated in-process (what the
RepQ-ViT-style baseline does); where they come from does not matter for the
conversion, which only needs calibrated quantizers.
"""
import copy
from dataclasses import dataclass
from typing import Callable, List

import pytest
import torch
from gplq_test_utils import DEIT_GPLQ, DET_GPLQ, build, load_cfg
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def build_model(cfg, **extra):
    """GPLQModel as the Runner builds it (top-level data_preprocessor merged),
    with ``extra`` model arguments (e.g. ``w4a4=...``)."""
    mc = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        mc.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    mc.update(extra)
    return build(cfg, mc)


@dataclass
class Case:
    """A calibrated W32A4 model and its calibration data."""
    cfg: object
    model: nn.Module  # GPLQModel, W32A4, activation scales calibrated
    batches: List  # calibration batches (as from the loader)

    def loader(self, num_images: int, batch_size: int):
        from gplq_mm.ptq.calib import build_calib_loader
        return build_calib_loader(self.cfg, num_images, batch_size, seed=0)

    def backbone_runner(self, model) -> Callable:
        def run(batch):
            data = model.data_preprocessor(batch, False)
            model.model.backbone(data['inputs'])
        return run

    def convert(self, batches=None, **kw):
        """(model, report): a copy of the W32A4 model, converted by
        ``weight_ptq``."""
        from gplq_mm.ptq.weight_ptq import weight_ptq
        from gplq_mm.quant import WeightQuantConfig
        model = copy.deepcopy(self.model)
        batches = self.batches if batches is None else batches
        report = weight_ptq(model.model, lambda: batches,
                            self.backbone_runner(model),
                            kw.pop('w_cfg', WeightQuantConfig()), **kw)
        return model, report


def _calibrated_case(name: str, num_images: int, batch_size: int) -> Case:
    from gplq_mm.ptq.calib import build_calib_loader, calibrate_activations
    from mmengine.registry import init_default_scope
    cfg = load_cfg(name)
    init_default_scope(cfg.default_scope)
    cfg.model.mimic = dict(enabled=False)
    model = build_model(cfg)
    batches = list(build_calib_loader(cfg, num_images, batch_size, seed=0))

    def full_forward(batch):
        data = model.data_preprocessor(batch, False)
        model(**data, mode='tensor')

    calibrate_activations(model, batches, full_forward)
    return Case(cfg, model, batches)


@pytest.fixture(scope='session')
def make_model():
    """``make_model(cfg, **model_kwargs)``: a fresh GPLQModel of ``cfg``."""
    return build_model


@pytest.fixture(scope='session')
def det_case(shapes_root) -> Case:
    """Micro Mask R-CNN (whole detector quantized), 4 images in batches of 2."""
    return _calibrated_case(DET_GPLQ, 4, 2)


@pytest.fixture(scope='session')
def cls_case(cls_root) -> Case:
    """Micro DeiT classifier, 8 images in batches of 4."""
    return _calibrated_case(DEIT_GPLQ, 8, 4)


@pytest.fixture(scope='session')
def det_converted(det_case):
    """(W4A4 model, report) of the micro Mask R-CNN (QwT on)."""
    return det_case.convert()


@pytest.fixture(scope='session')
def cls_converted(cls_case):
    """(W4A4 model, report) of the micro DeiT (QwT on; lambda 10 so that the
    fit generalises to the held-out rows from only 8 images x 17 tokens)."""
    return cls_case.convert(lam=10.0)
