"""``GPLQModel``: wraps an mmdet detector or mmpretrain classifier for GPLQ.

Usage in a config (the SoftTeacher pattern of mmdet)::

    _base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
    custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)
    model = dict(_delete_=True, type='GPLQModel', model=_base_.model,
                 quant=dict(scope='whole'))

The wrapped model is built and its quantizers injected in ``__init__``, so the
LSQ scales exist before mmengine builds the optimizer and the DDP wrapper.
Checkpoint keys are the wrapped model's keys under ``model.``; a plain FP32
checkpoint of the wrapped model (keys without ``model.``) loads too, with its
quantizer entries missing, to be calibrated by ``GPLQCalibrationHook``.
"""
from typing import Dict, List, Optional

import torch
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from gplq_mm.quant import all_act_calibrated
from .checkpoint_keys import (QUANT_KEY, check_loaded_keys, remap_plain_keys,
                              shape_mismatches)
from .injection import InjectConfig, inject
from .mimic import MimicConfig, capture_output, mimic_loss, pool_feature

__all__ = ['GPLQModel', 'QUANT_KEY', 'CheckpointMismatchError']


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the quantized model built from the config."""

@MODELS.register_module()
class GPLQModel(BaseModel):
    """Quantization wrapper (stage 1 Act-QAT, direct-QAT baseline, W4A4 eval).

    Args:
        model: Config of the detector / classifier to quantize.
        quant: :class:`~gplq_mm.models.injection.InjectConfig` fields.
        mimic: :class:`~gplq_mm.models.mimic.MimicConfig` fields (PCA
            feature mimicking; on by default for classifiers in our configs,
            off for detectors as in the paper).
        w4a4: Set by ``tools/gplq_quantize.py`` in the W4A4 config it writes:
            the layers are built directly in integer form (packed int4
            weights) and QwT compensation is attached.  Dict with keys
            ``w_bits`` and ``qwt_blocks`` (names of compensated blocks).
        strict_load: Turn mmengine's "missing/unexpected keys" warnings into a
            :class:`CheckpointMismatchError`.  Only quantizer keys may be
            missing, and only if the checkpoint has none at all (FP32 init).
        data_preprocessor: The config's top-level ``data_preprocessor``,
            which the Runner merges into the model config (mmpretrain
            configs keep mean/std there).  It is handed on to the wrapped
            model (unless that has its own), whose preprocessor this wrapper
            then uses.
        init_cfg: Unused (weights come from ``load_from``).
    """

    def __init__(self,
                 model: dict,
                 quant: Optional[dict] = None,
                 mimic: Optional[dict] = None,
                 w4a4: Optional[dict] = None,
                 strict_load: bool = True,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        if not isinstance(model, (dict, )) and not hasattr(model, 'get'):
            raise TypeError('GPLQModel(model=...) takes the config dict of the '
                            'model to quantize, e.g. model=_base_.model.')
        if model.get('type') == 'GPLQModel':
            raise ValueError('GPLQModel(model=...) got another GPLQModel: '
                             'wrap the plain detector/classifier config once.')
        model = ConfigDict(model)
        if data_preprocessor is not None:
            # what the Runner does for an unwrapped model (mmpretrain configs
            # rely on it: without it ImageClassifier would not normalise)
            model.setdefault('data_preprocessor', data_preprocessor)
        # mmdet reads e.g. train_cfg.rpn as attributes: keep ConfigDict access
        inner = MODELS.build(model)
        super().__init__(data_preprocessor=inner.data_preprocessor,
                         init_cfg=init_cfg)
        self.model = inner
        self.quant_cfg = InjectConfig.from_dict(quant)
        self.mimic_cfg = MimicConfig(**(mimic or {}))
        self.strict_load = strict_load
        self.report = inject(self.model, self.quant_cfg)
        self.w4a4 = dict(w4a4) if w4a4 else None
        if self.w4a4 is not None:
            from gplq_mm.ptq.convert import build_w4a4_structure
            build_w4a4_structure(self, **self.w4a4)
        print_log('GPLQ quantizer injection (scope=%s):\n%s' %
                  (self.quant_cfg.scope, self.report.table()),
                  logger='current')
        # Teacher and PCA basis are deliberately not submodules/buffers: they
        # stay out of state_dict (test-time checkpoints need neither) and out
        # of DDP; GPLQCalibrationHook saves/restores them for resume.
        self.__dict__['teacher'] = None
        self.__dict__['pca'] = None
        self._ckpt_has_quant = None
        self._shape_mismatch: List[str] = []
        self._register_load_state_dict_pre_hook(self._remap_fp32_keys)
        self.register_load_state_dict_post_hook(self._check_keys)

    # -- quantizers ----------------------------------------------------------
    def all_calibrated(self) -> bool:
        """Whether every activation quantizer has a scale."""
        return all_act_calibrated(self.model)

    # -- teacher / mimic -----------------------------------------------------
    @property
    def mimic_on(self) -> bool:
        return self.mimic_cfg.enabled and self.mimic_cfg.weight > 0

    def feature_module(self, model: Optional[nn.Module] = None) -> nn.Module:
        model = model or self.model
        where = self.mimic_cfg.feature
        if where == 'auto':
            where = 'neck' if getattr(model, 'neck', None) is not None \
                else 'backbone'
        mod = getattr(model, where, None)
        if mod is None:
            raise ValueError(f'mimic.feature={where!r}: the model has no '
                             f'.{where}; choose "backbone" or "neck".')
        return mod

    def set_teacher(self, teacher: nn.Module, mean: torch.Tensor,
                    components: torch.Tensor) -> None:
        dev = next(self.model.parameters()).device
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.__dict__['teacher'] = teacher
        self.__dict__['pca'] = (mean.to(dev), components.to(dev))

    def teacher_features(self, inputs: torch.Tensor) -> torch.Tensor:
        store = {}
        h = capture_output(self.feature_module(self.teacher), store, 't')
        try:
            with torch.no_grad():
                self.teacher.extract_feat(inputs)
        finally:
            h.remove()
        return pool_feature(store['t'])

    # -- forward -------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, data_samples=None,
                mode: str = 'tensor'):
        if mode != 'loss' or not self.mimic_on:
            return self.model(inputs, data_samples, mode)
        if self.teacher is None:
            raise RuntimeError(
                'mimic is enabled but no teacher/PCA basis is set: add '
                'GPLQCalibrationHook to custom_hooks (it builds them in '
                'before_train), or set mimic=dict(enabled=False).')
        store = {}
        h = capture_output(self.feature_module(), store, 's')
        try:
            losses = self.model(inputs, data_samples, 'loss')
        finally:
            h.remove()
        f_s = pool_feature(store['s'])
        f_t = self.teacher_features(inputs)
        mean, comps = self.pca
        losses['loss_mimic'] = self.mimic_cfg.weight * mimic_loss(
            f_s, f_t, mean, comps)
        return losses

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- checkpoint loading (policy: checkpoint_keys.py) -------------------
    def _remap_fp32_keys(self, state_dict: Dict, prefix: str, *args) -> None:
        """Accept checkpoints of the plain model (keys without ``model.``)."""
        self._ckpt_has_quant = remap_plain_keys(state_dict, prefix)
        self._shape_mismatch = shape_mismatches(
            state_dict, self.state_dict(prefix=prefix, keep_vars=True))

    def _check_keys(self, module: nn.Module, incompatible) -> None:
        if not self.strict_load:
            return
        problem = check_loaded_keys(incompatible, self._ckpt_has_quant,
                                    self._shape_mismatch)
        if problem:
            raise CheckpointMismatchError(problem)
