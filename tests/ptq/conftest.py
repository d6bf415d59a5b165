"""Tiny real models for the stage-2 tests: calibrated W32A4 and converted W4A4.

The models are the micro fixtures of ``tests/configs`` (mmdet Swin Mask R-CNN
at 64 px, mmpretrain DeiT at 32 px) on data generated into a temporary
directory.  Activation scales are calibrated in-process (what the
RepQ-ViT-style baseline does); where they come from does not matter for the
conversion, which only needs calibrated quantizers.
"""
import copy
import os
import os.path as osp
from dataclasses import dataclass
from typing import Callable, List

import pytest
import torch
from torch import nn

CONFIGS = osp.join(osp.dirname(osp.dirname(__file__)), 'configs')
DET_CFG = osp.join(CONFIGS, 'gplq_mask-rcnn_swin-micro_fpn_shapes_w32a4.py')
CLS_CFG = osp.join(CONFIGS, 'gplq_deit-micro_cls_w32a4.py')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='session')
def data_dirs(tmp_path_factory):
    """Generated shapes (COCO, 8 train / 4 val, 64 px) and a 10-class folder
    set (20 train / 10 val, 32 px); the fixture configs read their location
    from GPLQ_TEST_SHAPES / GPLQ_TEST_CLS."""
    from gplq_mm.demo.data import make_classification, make_shapes_coco
    root = tmp_path_factory.mktemp('data')
    shapes, cls = str(root / 'shapes'), str(root / 'cls')
    make_shapes_coco(shapes, 8, 4, 64, seed=0)
    make_classification(cls, 20, 10, seed=0, source='generated', img_size=32)
    old = {k: os.environ.get(k) for k in ('GPLQ_TEST_SHAPES', 'GPLQ_TEST_CLS')}
    os.environ['GPLQ_TEST_SHAPES'] = shapes + '/'
    os.environ['GPLQ_TEST_CLS'] = cls + '/'
    yield dict(shapes=shapes, cls=cls)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def load_cfg(path: str):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    cfg.model.mimic = dict(enabled=False)
    return cfg


def build_model(cfg, **extra):
    """GPLQModel as the Runner builds it (top-level data_preprocessor merged)."""
    from mmengine.registry import MODELS
    mc = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        mc.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    mc.update(extra)
    return MODELS.build(mc)


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
        """Copy of the W32A4 model converted by ``weight_ptq``; (model, report)."""
        from gplq_mm.ptq.weight_ptq import weight_ptq
        from gplq_mm.quant import WeightQuantConfig
        model = copy.deepcopy(self.model)
        batches = self.batches if batches is None else batches
        report = weight_ptq(model.model, lambda: batches,
                            self.backbone_runner(model),
                            kw.pop('w_cfg', WeightQuantConfig()), **kw)
        return model, report


def _calibrated_case(path: str, num_images: int, batch_size: int) -> Case:
    from gplq_mm.ptq.calib import build_calib_loader, calibrate_activations
    cfg = load_cfg(path)
    torch.manual_seed(0)
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
def det_case(data_dirs) -> Case:
    """Micro Mask R-CNN (whole detector quantized), 4 images in batches of 2."""
    return _calibrated_case(DET_CFG, 4, 2)


@pytest.fixture(scope='session')
def cls_case(data_dirs) -> Case:
    """Micro DeiT classifier, 8 images in batches of 4."""
    return _calibrated_case(CLS_CFG, 8, 4)


@pytest.fixture(scope='session')
def det_converted(det_case):
    """(W4A4 model, report) of the micro Mask R-CNN (QwT on)."""
    return det_case.convert()


@pytest.fixture(scope='session')
def cls_converted(cls_case):
    """(W4A4 model, report) of the micro DeiT (QwT on, lambda 1 so that the
    fit helps on held-out rows despite only 8 images)."""
    return cls_case.convert(lam=1.0)
