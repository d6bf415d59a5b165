"""Thin nn.Modules that hold quantizer state and call :mod:`.functional`,
and the helpers that find them in a model."""
from enum import Enum
import torch
from torch import Tensor, nn

from . import functional as QF
from . import onnx_ops
from .config import QuantConfig, WeightQuantConfig
from .observers import build_observer


class QState(str, Enum):
    """What an :class:`ActQuantizer` does in ``forward``.

    OFF: identity.  CALIBRATING: identity, while an observer records statistics.
    SEQUENTIAL: calibrate on the tensor of this call, then fake-quantize it
    and stay FROZEN (RepQ-ViT's one-batch calibration: each quantizer is
    calibrated on the output of the quantized layers before it).
    LEARNING: fake-quantize, the scale learns by LSQ.  FROZEN: fake-quantize,
    the scale gets no gradient (stage 2, evaluation of a finished model).
    """
    OFF = 'off'
    CALIBRATING = 'calibrating'
    SEQUENTIAL = 'sequential'
    LEARNING = 'learning'
    FROZEN = 'frozen'


class ActQuantizer(nn.Module):
    """Activation fake quantizer with a calibrated, LSQ-learned scale.

    The scale exists from construction on (so an optimizer built right after
    model construction sees it); ``initialized`` records whether it has been
    calibrated or loaded, and a quantizing forward with an uncalibrated scale is
    an error rather than silently wrong numbers.

    Args:
        cfg: The quantizer config.
        num_channels: Number of scale entries along ``cfg.axis`` (1 for
            per-tensor).
        name: Used in error messages (set by injection to the module path).
    """

    def __init__(self, cfg: QuantConfig, num_channels: int = 1, name: str = ''):
        super().__init__()
        if cfg.granularity == 'per_tensor':
            num_channels = 1
        if num_channels < 1:
            raise ValueError(f'num_channels must be >= 1, got {num_channels}')
        self.cfg = cfg
        self.name = name
        self.num_channels = num_channels
        self.scale = nn.Parameter(torch.ones(num_channels),
                                  requires_grad=cfg.learnable)
        self.register_buffer('initialized', torch.tensor(False))
        if cfg.zero_point:  # only then: other checkpoints keep their keys
            self.register_buffer('zero_point', torch.zeros(num_channels))
        self.state = QState.LEARNING if cfg.learnable else QState.FROZEN
        self.observer = None

    # -- state ---------------------------------------------------------------
    def set_state(self, state) -> None:
        state = QState(state)
        if state == QState.LEARNING and not self.cfg.learnable:
            state = QState.FROZEN
        if state in (QState.CALIBRATING, QState.SEQUENTIAL):
            self.observer = build_observer(self.cfg, self.num_channels,
                                           self.name)
        self.state = state

    def finish_calibration(self) -> None:
        """Turn the observer's statistics into the scale and start quantizing."""
        if self.observer is None:
            raise RuntimeError(f'{self.name}: finish_calibration() without '
                               'set_state("calibrating") first.')
        self.observer.sync()
        lo, hi = self.observer.bounds()
        zero = None
        if self.cfg.zero_point:  # asymmetric: the grid spans [lo, hi]
            scale, zero = QF.affine_qparams(lo, hi, self.cfg.qmax)
        else:
            if self.cfg.kind == 'log2':
                absmax = hi.clamp_min(0)  # post-softmax: top level is max(x)
            elif self.cfg.signed:
                absmax = torch.maximum(lo.abs(), hi.abs())
            else:
                absmax = hi.clamp_min(0)
            qmax = 1 if self.cfg.kind == 'log2' else self.cfg.qmax
            scale = QF.choose_qparams(absmax, qmax)
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale))
            if zero is not None:
                self.zero_point.copy_(zero.to(self.zero_point))
            self.initialized.fill_(True)
        self.observer = None
        self.set_state(QState.LEARNING)

    def effective_scale(self, ndim: int) -> Tensor:
        s = self.scale.clamp_min(QF.MIN_SCALE)
        if self.state == QState.FROZEN:
            s = s.detach()
        return QF.scale_view(s, ndim, self.cfg.axis)

    def check_ready(self, x: Tensor) -> None:
        if not bool(self.initialized):
            raise RuntimeError(
                f'Activation quantizer {self.name or "(unnamed)"} has no '
                'calibrated scale. Its scales come from stage-1 calibration '
                '(GPLQCalibrationHook, before_train) or from a W32A4/W4A4 '
                'checkpoint; an FP32 checkpoint has none. Load a checkpoint '
                'produced by gplq_mm, or run stage 1 first.')
        if self.cfg.axis is not None:
            n = x.shape[self.cfg.axis]
            if n != self.num_channels:
                raise ValueError(
                    f'{self.name}: input has {n} entries along axis '
                    f'{self.cfg.axis} (shape {tuple(x.shape)}), the quantizer '
                    f'has {self.num_channels} scales.')

    # -- forward -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.state == QState.OFF:
            return x
        if self.state == QState.CALIBRATING:
            self.observer.update(x)
            return x
        if self.state == QState.SEQUENTIAL:
            self.observer.update(x)
            self.finish_calibration()
        self.check_ready(x)
        if torch.onnx.is_in_onnx_export():  # one gplq::QDQ node
            self._no_zero_point('ONNX export')
            return onnx_ops.qdq(x, self.scale, self.cfg, self.name)
        s = self.effective_scale(x.ndim)
        if self.cfg.zero_point:
            z = QF.scale_view(self.zero_point, x.ndim, self.cfg.axis)
            return QF.fake_quantize_affine(x, s, z, self.cfg.qmax)
        if self.cfg.kind == 'log2':
            return QF.fake_quantize_log2(x, s, self.cfg.bits)
        return QF.fake_quantize_lsq(x, s, self.cfg.qmin, self.cfg.qmax)

    def _no_zero_point(self, what: str) -> None:
        if self.cfg.zero_point:
            raise ValueError(
                f'{self.name}: {what} needs a zero-point-free grid; this '
                'quantizer is asymmetric (zero_point=True, the RepQ-ViT '
                'baseline), which gplq_mm evaluates in fake quantization only.')

    def codes(self, x: Tensor) -> Tensor:
        """Integer codes (as float) of ``x`` on this quantizer's grid."""
        self._no_zero_point('an integer layer')
        s = QF.scale_view(self.scale.detach().clamp_min(QF.MIN_SCALE), x.ndim,
                          self.cfg.axis)
        return QF.quantize(x, s, self.cfg.qmin, self.cfg.qmax)

    def extra_repr(self) -> str:
        return f'{self.cfg.describe()}, channels={self.num_channels}, ' \
               f'state={self.state.value}'


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight fake quantizer.

    The scale is searched (MSE over clipping ratios) by :meth:`calibrate`; with
    ``cfg.learnable`` it then learns by LSQ (direct W4A4 QAT baseline).
    """

    def __init__(self, cfg: WeightQuantConfig, num_channels: int, name: str = ''):
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.scale = nn.Parameter(torch.ones(num_channels),
                                  requires_grad=cfg.learnable)
        self.register_buffer('initialized', torch.tensor(False))
        # the grid the scale belongs to (direct QAT trains it on the folded
        # weight): max_shift for fold='pow2', -1 for 'full'; checked on load
        self.register_buffer('fold_shift', torch.tensor(
            cfg.max_shift if cfg.fold == 'pow2' else -1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        want = int(self.fold_shift)
        key = prefix + 'fold_shift'
        if prefix + 'scale' in state_dict:
            if key not in state_dict and want < 0:
                # written before the option: the fully folded grid, as asked
                state_dict[key] = self.fold_shift.clone()
            elif key not in state_dict:
                raise ValueError(
                    f'{self.name}: this checkpoint was written before the '
                    'weight fold was an option; its weight scales belong to '
                    'the fully folded weights. Set quant.weight.fold="full" '
                    'in the config to use it.')
            got = int(state_dict[key])
            if got != want:
                def say(v):
                    return 'fold="full"' if v < 0 else \
                        f'fold="pow2", max_shift={v}'
                raise ValueError(
                    f'{self.name}: the checkpoint\'s weight scales were '
                    f'trained with {say(got)}, the config asks for '
                    f'{say(want)}. Set quant.weight to match the checkpoint.')
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def calibrate(self, weight: Tensor) -> None:
        n = 1 if self.cfg.search == 'minmax' else self.cfg.num_candidates
        s = QF.search_weight_scale(weight, self.cfg.qmin, self.cfg.qmax,
                                   self.cfg.axis, self.cfg.min_ratio, n)
        self.scale.copy_(s.to(self.scale))
        self.initialized.fill_(True)

    def forward(self, weight: Tensor) -> Tensor:
        if not bool(self.initialized):
            self.calibrate(weight)
        s = QF.scale_view(self.scale.clamp_min(QF.MIN_SCALE), weight.ndim,
                          self.cfg.axis)
        if not self.cfg.learnable:
            return QF.fake_quantize(weight, s, self.cfg.qmin, self.cfg.qmax)
        return QF.fake_quantize_lsq(weight, s, self.cfg.qmin, self.cfg.qmax)

    def codes(self, weight: Tensor) -> Tensor:
        s = QF.scale_view(self.scale.detach().clamp_min(QF.MIN_SCALE),
                          weight.ndim, self.cfg.axis)
        return QF.quantize(weight, s, self.cfg.qmin, self.cfg.qmax)

    def extra_repr(self) -> str:
        return f'W{self.cfg.bits} per-out-channel {self.cfg.search}'


def iter_act_quantizers(module: nn.Module):
    """Yield ``(name, quantizer)`` for every :class:`ActQuantizer` in ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def iter_weight_quantizers(module: nn.Module):
    """Yield ``(name, quantizer)`` for every :class:`WeightQuantizer` in
    ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, WeightQuantizer):
            yield name, m


def set_act_state(module: nn.Module, state) -> int:
    """Set the state of every activation quantizer in ``module``; returns count."""
    n = 0
    for _, q in iter_act_quantizers(module):
        q.set_state(state)
        n += 1
    return n


def all_act_calibrated(module: nn.Module) -> bool:
    """Whether every activation quantizer in ``module`` has a scale
    (calibrated or loaded from a checkpoint)."""
    return all(bool(q.initialized) for _, q in iter_act_quantizers(module))
