"""Quantized Linear / Conv2d modules.

* :class:`QLinear`, :class:`QConv2d`: FP32 weights (optionally fake-quantized
  by a :class:`WeightQuantizer`) with a fake-quantized input.  Stage 1
  (Act-QAT, W32A4) and the direct-W4A4-QAT baseline.
* :class:`IntQLinear`, :class:`IntQConv2d`: the deployable W4A4 form written by
  stage 2.  The input's per-channel activation scale is split as
  ``s = t * 2^e`` (``WeightQuantConfig.fold``; ``fold='full'``: ``t = s``,
  ``e = 0``), ``t`` is folded into the weight (``W' = W diag(t)``), ``W'`` is
  quantized per output channel to codes ``Wc`` with scale ``d``, and
  ``y = d * ((Xc << e) @ Wc^T) + b`` where ``Xc`` are the activation codes: an
  integer shift and an integer GEMM followed by one per-output-channel
  rescale.  The GEMM runs on oneDNN's int8 kernel on x86 CPUs and otherwise
  in float, exactly, since the sums stay far below 2^24 (:mod:`.int_gemm`;
  both give the same bits).
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as QF
from . import int_gemm as IG
from . import onnx_ops
from .int4 import pack_int4, unpack_int4_float
from .kernels import lsq_conv2d, lsq_linear
from .config import QuantConfig, WeightQuantConfig
from .gptq import gptq_codes
from .quantizer import ActQuantizer, QState, WeightQuantizer


def _act_channels(cfg: QuantConfig, in_channels: int) -> int:
    return in_channels if cfg.granularity == 'per_channel' else 1


class QLinear(nn.Linear):
    """``nn.Linear`` whose input (and optionally weight) is fake-quantized.

    Parameter names are those of ``nn.Linear`` (``weight``, ``bias``), so FP32
    checkpoints load unchanged; the quantizer adds ``act_quant.scale`` and
    ``act_quant.initialized`` (and ``weight_quant.*``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act_cfg: Optional[QuantConfig] = None,
                 weight_cfg: Optional[WeightQuantConfig] = None, name: str = '',
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device,
                         dtype=dtype)
        if act_cfg is not None and act_cfg.granularity == 'per_token':
            raise ValueError(f'{name}: a Linear input is quantized per_channel '
                             'or per_tensor, not per_token.')
        self.act_quant = None if act_cfg is None else ActQuantizer(
            act_cfg, _act_channels(act_cfg, in_features), f'{name}.act_quant')
        self.weight_quant = None if weight_cfg is None else WeightQuantizer(
            weight_cfg, out_features, f'{name}.weight_quant')

    @classmethod
    def from_float(cls, mod: nn.Linear, act_cfg: Optional[QuantConfig],
                   weight_cfg: Optional[WeightQuantConfig] = None,
                   name: str = '') -> 'QLinear':
        """Wrap ``mod``, sharing its parameter objects (no copy)."""
        q = cls(mod.in_features, mod.out_features, mod.bias is not None,
                act_cfg, weight_cfg, name, device='meta')
        q.weight = mod.weight
        q.bias = mod.bias
        q.to(mod.weight.device)
        q.train(mod.training)
        return q

    def to_float(self) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                      device='meta')
        m.weight, m.bias = self.weight, self.bias
        m.train(self.training)
        return m

    def quantized_weight(self) -> Tensor:
        return _folded_fake_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        aq = self.act_quant
        if aq is not None and aq.state in (QState.LEARNING, QState.FROZEN) \
                and aq.cfg.kind == 'uniform' and not aq.cfg.zero_point:
            aq.check_ready(x)
            s = aq.effective_scale(1)  # [C] or scalar: broadcasts on last axis
            return lsq_linear(x, s, w, self.bias, aq.cfg.qmin, aq.cfg.qmax)
        if aq is not None:
            x = aq(x)
        return F.linear(x, w, self.bias)


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input (per input channel, axis 1) is fake-quantized."""

    def __init__(self, *args, act_cfg: Optional[QuantConfig] = None,
                 weight_cfg: Optional[WeightQuantConfig] = None, name: str = '',
                 **kwargs):
        super().__init__(*args, **kwargs)
        if act_cfg is not None:
            if act_cfg.granularity == 'per_token':
                raise ValueError(f'{name}: a Conv2d input is quantized '
                                 'per_channel or per_tensor, not per_token.')
            if act_cfg.granularity == 'per_channel':
                act_cfg = dataclasses.replace(act_cfg, axis=1)
        self.act_quant = None if act_cfg is None else ActQuantizer(
            act_cfg, _act_channels(act_cfg, self.in_channels),
            f'{name}.act_quant')
        self.weight_quant = None if weight_cfg is None else WeightQuantizer(
            weight_cfg, self.out_channels, f'{name}.weight_quant')

    @classmethod
    def from_float(cls, mod: nn.Conv2d, act_cfg: Optional[QuantConfig],
                   weight_cfg: Optional[WeightQuantConfig] = None,
                   name: str = '') -> 'QConv2d':
        q = cls(mod.in_channels, mod.out_channels, mod.kernel_size,
                stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                groups=mod.groups, bias=mod.bias is not None,
                padding_mode=mod.padding_mode, act_cfg=act_cfg,
                weight_cfg=weight_cfg, name=name, device='meta')
        q.weight = mod.weight
        q.bias = mod.bias
        q.to(mod.weight.device)  # the quantizers' scales follow the weight
        q.train(mod.training)
        return q

    def to_float(self) -> nn.Conv2d:
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                      stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=self.groups,
                      bias=self.bias is not None, padding_mode=self.padding_mode,
                      device='meta')
        m.weight, m.bias = self.weight, self.bias
        m.train(self.training)
        return m

    def quantized_weight(self) -> Tensor:
        return _folded_fake_weight(self)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        aq = self.act_quant
        if aq is not None and aq.state in (QState.LEARNING, QState.FROZEN) \
                and aq.cfg.kind == 'uniform' and not aq.cfg.zero_point \
                and self.padding_mode == 'zeros' \
                and not isinstance(self.padding, str) and x.ndim == 4:
            aq.check_ready(x)
            s = aq.effective_scale(2)  # [C] (axis 1 of a 2-D view) or scalar
            return lsq_conv2d(x, s, w, self.bias, self.stride, self.padding,
                                 self.dilation, self.groups, aq.cfg.qmin,
                                 aq.cfg.qmax)
        if aq is not None:
            x = aq(x)
        return self._conv_forward(x, w, self.bias)


def _input_scale_for_weight(act_scale: Tensor, weight_shape) -> Tensor:
    """``act_scale`` laid out to broadcast against an ``[out, in/groups, ...]``
    weight: scalar for per-tensor, else entry ``[o, j]`` is the scale of input
    channel ``g(o) * in/groups + j`` (``g(o)``: group of output channel o).
    """
    s = act_scale.reshape(-1)
    if s.numel() == 1:
        return s.reshape([1] * len(weight_shape))
    out, cin_g = weight_shape[0], weight_shape[1]
    groups = s.numel() // cin_g
    if groups * cin_g != s.numel() or out % groups:
        raise ValueError(f'activation scale of {s.numel()} channels does not '
                         f'match a weight of shape {tuple(weight_shape)}.')
    s = s.reshape(groups, 1, cin_g).expand(groups, out // groups, cin_g)
    return s.reshape([out, cin_g] + [1] * (len(weight_shape) - 2))


def _folded_fake_weight(mod) -> Tensor:
    """Weight as the integer layer will see it (direct-W4A4-QAT baseline).

    The weight quantizer acts on the *folded* weight ``W diag(t)`` (t: the part
    of the input's activation scale that ``cfg.fold`` folds), exactly the grid
    :func:`to_integer` uses, so a
    model trained this way converts to integer form without a new rounding.
    Gradients reach W, the weight scale and the activation scale.
    """
    if mod.weight_quant is None:
        return mod.weight
    aq = mod.act_quant
    if aq is None or not bool(aq.initialized):
        return mod.weight_quant(mod.weight)
    s = aq.scale.clamp_min(QF.MIN_SCALE)
    cfg = mod.weight_quant.cfg
    if cfg.fold == 'pow2':
        # the shifts are piecewise constant in s: the gradient flows through t
        s = s / torch.exp2(QF.split_pow2(s, cfg.max_shift)[1])
    s = _input_scale_for_weight(s, mod.weight.shape)
    return mod.weight_quant(mod.weight * s) / s


def fold_and_quantize_weight(weight: Tensor, act_scale: Tensor,
                             cfg: WeightQuantConfig,
                             scale: Optional[Tensor] = None,
                             hessian: Optional[Tensor] = None):
    """Fold the per-input-channel activation scale into ``weight`` and quantize.

    Args:
        weight: ``[out, in, ...]`` FP32 weight.
        act_scale: ``[in]`` (or scalar) activation scale of the layer input
            (all input channels; grouped convolutions are handled).
        cfg: Weight quantizer config (per output channel, axis 0); ``cfg.fold``
            says which part ``t`` of the activation scale is folded (the rest,
            ``2^shift``, shifts the activation codes).
        scale: A per-output-channel scale to use instead of searching one
            (e.g. learned by the direct-QAT baseline on the folded weight).
        hessian: ``[K, K]`` Gram matrix of the integer layer's inputs
            (shifted codes ``Xc * 2^e``, K = weight[0].numel()); with
            ``cfg.rounding='gptq'`` the codes on the grid are chosen by GPTQ
            against it (:func:`gplq_mm.quant.gptq.gptq_codes`), otherwise
            ignored.

    Returns:
        ``(codes, scale, shift)``: integer codes (float tensor, same shape as
        weight), the per-output-channel scale ``[out]`` of ``W' = W diag(t)``
        and the per-input-channel shift ``e`` (shaped like ``act_scale``).
    """
    s = act_scale.detach().float().clamp_min(QF.MIN_SCALE)  # as in codes()
    if cfg.fold == 'pow2':
        t, shift = QF.split_pow2(s, cfg.max_shift)
    else:
        t, shift = s, torch.zeros_like(s)
    folded = weight.detach().float() * _input_scale_for_weight(t, weight.shape)
    if scale is None:
        n = 1 if cfg.search == 'minmax' else cfg.num_candidates
        scale = QF.search_weight_scale(folded, cfg.qmin, cfg.qmax, 0,
                                       cfg.min_ratio, n)
    else:
        scale = scale.detach().float().clamp_min(QF.MIN_SCALE)
    if hessian is not None and cfg.rounding == 'gptq':
        codes = gptq_codes(folded.reshape(folded.shape[0], -1), hessian, scale,
                           cfg.qmin, cfg.qmax, cfg.gptq_damp
                           ).reshape(folded.shape)
    else:
        codes = QF.quantize(folded, QF.scale_view(scale, folded.ndim, 0),
                            cfg.qmin, cfg.qmax)
    return codes, scale, shift


def integer_layer_input(mod: nn.Module, x: Tensor,
                        cfg: WeightQuantConfig) -> Tensor:
    """What the integer form of the calibrated QLinear ``mod`` will multiply
    for the input ``x``: the activation codes shifted left by the ``e`` of
    ``cfg.fold`` (the ``Z`` of ``y = (W diag(t)) Z``; GPTQ's Hessian is
    ``Z^T Z``).  ``[..., in_features]``, integer-valued floats."""
    aq = mod.act_quant
    z = aq.codes(x)
    if cfg.fold == 'pow2':
        s = aq.scale.detach().float().clamp_min(QF.MIN_SCALE)  # as above
        e = QF.split_pow2(s, cfg.max_shift)[1]
        z = z.mul_(QF.scale_view(torch.exp2(e), z.ndim, aq.cfg.axis))
    return z


class _IntWeightMixin:
    """Packed int4 (or int8 for other bit widths) weight codes + scales."""

    def _init_int_weight(self, shape, bits: int, shift: bool = False):
        self.w_bits = bits
        #: integer GEMM backend (:mod:`.int_gemm`): 'auto', 'onednn' or
        #: 'reference'; all give the same bits.  Set it on a whole model
        #: with :func:`set_int_gemm`.
        self.int_gemm = 'auto'
        self._gemm = None  # (key, prepacked GEMM or None); never saved
        self.weight_shape = tuple(shape)
        # per-input-channel left shift of the activation codes (fold='pow2');
        # absent for fold='full', so checkpoints written before it load
        if shift:
            self.register_buffer('input_shift', torch.zeros(
                self.act_quant.scale.numel(), dtype=torch.uint8))
        else:
            self.input_shift = None
        flat = int(torch.Size(shape[1:]).numel())
        if bits <= 4:
            packed = torch.zeros(shape[0], (flat + 1) // 2, dtype=torch.uint8)
        else:
            packed = torch.zeros(shape[0], flat, dtype=torch.int8)
        self.register_buffer('weight_packed', packed)
        self.register_buffer('weight_scale', torch.ones(shape[0]))

    def set_weight_codes(self, codes: Tensor, scale: Tensor,
                         shift: Optional[Tensor] = None) -> None:
        if shift is not None and bool((shift != 0).any()):
            if self.input_shift is None:
                raise ValueError('this integer layer was built without input '
                                 'shifts (fold="full"); got non-zero shifts.')
        if self.input_shift is not None:
            self.input_shift.copy_(torch.zeros_like(self.input_shift)
                                   if shift is None else shift.reshape(-1))
        flat = codes.reshape(codes.shape[0], -1)
        if self.w_bits <= 4:
            self.weight_packed.copy_(pack_int4(flat))
        else:
            self.weight_packed.copy_(flat.round().to(torch.int8))
        self.weight_scale.copy_(scale.reshape(-1))

    def weight_codes(self) -> Tensor:
        flat = int(torch.Size(self.weight_shape[1:]).numel())
        if self.w_bits <= 4:
            c = unpack_int4_float(self.weight_packed, flat)
        else:
            c = self.weight_packed.float()
        return c.reshape(self.weight_shape)

    def dequantized_weight(self) -> Tensor:
        """FP32 weight equivalent to the integer layer, in input units.

        ``W_eff = d * Wc / s``: what a float layer on the *fake-quantized*
        input must use to give the same output.
        """
        w = self.weight_codes() * QF.scale_view(self.weight_scale, len(
            self.weight_shape), 0)
        s = self.act_quant.scale.detach().clamp_min(QF.MIN_SCALE)
        if self.input_shift is not None:
            s = s / torch.exp2(self.input_shift.to(s.dtype)).reshape(s.shape)
        return w / _input_scale_for_weight(s, self.weight_shape)

    def __getstate__(self):
        # the prepacked oneDNN weight is an opaque tensor: deepcopy and
        # pickle drop it, the copy rebuilds it on its first forward
        state = super().__getstate__().copy()
        state['_gemm'] = None
        return state

    def _gemm_for(self, device: torch.device):
        """The prepacked integer GEMM for this layer, or None (reference)."""
        shift = self.input_shift
        key = (self.int_gemm, device, self.weight_packed.data_ptr(),
               self.weight_packed._version, self.weight_scale.data_ptr(),
               self.weight_scale._version,
               None if shift is None else (shift.data_ptr(), shift._version))
        if self._gemm is not None and self._gemm[0] == key:
            return self._gemm[1]
        cfg = self.act_quant.cfg
        max_shift = 0 if shift is None or shift.numel() == 0 else int(
            shift.max())
        lo, hi = IG.code_range(cfg.qmin, cfg.qmax, max_shift)
        backend, zp = IG.choose_backend(self.int_gemm, device, lo, hi,
                                        self.act_quant.name)
        gemm = IG.OneDNNLinear(self.weight_codes(), self.weight_scale, zp) \
            if backend == 'onednn' else None
        self._gemm = (key, gemm)
        return gemm

    def shifted_codes(self, x: Tensor, axis: int) -> Tensor:
        """Activation codes of ``x``, shifted left by ``input_shift``."""
        xc = self.act_quant.codes(x)
        if self.input_shift is None:
            return xc
        mult = torch.exp2(self.input_shift.to(xc.dtype))
        return xc.mul_(QF.scale_view(mult, xc.ndim, axis))


class IntQLinear(_IntWeightMixin, nn.Module):
    """W4A4 Linear: ``y = d * ((Xc << e) @ Wc^T) + b`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 act_cfg: QuantConfig, w_bits: int = 4, name: str = '',
                 shift: bool = False):
        super().__init__()
        if act_cfg.granularity == 'per_token' or act_cfg.kind != 'uniform':
            raise ValueError(f'{name}: integer layers need a uniform per-channel '
                             'or per-tensor input quantizer.')
        self.in_features, self.out_features = in_features, out_features
        self.act_quant = ActQuantizer(act_cfg, _act_channels(act_cfg, in_features),
                                      f'{name}.act_quant')
        self.act_quant.set_state(QState.FROZEN)
        self._init_int_weight((out_features, in_features), w_bits, shift)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        self.act_quant.check_ready(x)
        if torch.onnx.is_in_onnx_export():  # one gplq::IntLinear node
            return onnx_ops.int_linear(self, x)
        xc = self.shifted_codes(x, -1)
        gemm = self._gemm_for(x.device)
        if gemm is None:
            y = IG.reference_linear(xc, self.weight_codes()).mul_(
                self.weight_scale)
        else:
            y = gemm(xc)  # rescaled in the kernel
        if self.bias is not None:
            y = y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        return f'in={self.in_features}, out={self.out_features}, ' \
               f'W{self.w_bits}A{self.act_quant.cfg.bits}'


class IntQConv2d(_IntWeightMixin, nn.Module):
    """W4A4 Conv2d: integer convolution of activation codes and weight codes."""

    def __init__(self, conv: nn.Conv2d, act_cfg: QuantConfig, w_bits: int = 4,
                 name: str = '', shift: bool = False):
        super().__init__()
        if act_cfg.granularity == 'per_token' or act_cfg.kind != 'uniform':
            raise ValueError(f'{name}: integer layers need a uniform per-channel '
                             'or per-tensor input quantizer.')
        if act_cfg.granularity == 'per_channel':
            act_cfg = dataclasses.replace(act_cfg, axis=1)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != 'zeros':
            raise ValueError(f'{name}: padding_mode={conv.padding_mode} is not '
                             'supported by the integer conv.')
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.act_quant = ActQuantizer(
            act_cfg, _act_channels(act_cfg, conv.in_channels), f'{name}.act_quant')
        self.act_quant.set_state(QState.FROZEN)
        self._init_int_weight(tuple(conv.weight.shape), w_bits, shift)
        self.bias = nn.Parameter(torch.zeros(conv.out_channels)) \
            if conv.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        self.act_quant.check_ready(x)
        if torch.onnx.is_in_onnx_export():  # one gplq::IntConv node
            return onnx_ops.int_conv(self, x)
        xc = self.shifted_codes(x, 1)
        y = F.conv2d(xc, self.weight_codes(), None, self.stride, self.padding,
                     self.dilation, self.groups)
        y = y.mul_(self.weight_scale.reshape(1, -1, 1, 1))
        if self.bias is not None:
            y = y.add_(self.bias.reshape(1, -1, 1, 1))
        return y

    def extra_repr(self) -> str:
        return f'{self.in_channels}->{self.out_channels}, ' \
               f'W{self.w_bits}A{self.act_quant.cfg.bits}'


def to_integer(mod: nn.Module, w_cfg: WeightQuantConfig, name: str = '',
               use_learned_scale: bool = False,
               hessian: Optional[Tensor] = None):
    """Convert a calibrated :class:`QLinear`/:class:`QConv2d` to its integer form.

    The activation quantizer (scale, state) is carried over; the weight is
    folded with (part of, ``w_cfg.fold``) the activation scale and quantized
    per output channel, with a
    searched clipping range or, with ``use_learned_scale``, the scale the
    layer's weight quantizer learned (direct-QAT baseline: then the integer
    layer computes exactly what the trained fake-quant layer computed).
    ``hessian``: see :func:`fold_and_quantize_weight` (GPTQ rounding).
    """
    aq = mod.act_quant
    if aq is None or not bool(aq.initialized):
        raise RuntimeError(f'{name}: the input quantizer must be calibrated '
                           'before the weights are quantized (stage 1 first).')
    aq._no_zero_point('an integer layer')
    learned = None
    if use_learned_scale and hessian is not None:
        raise ValueError(f'{name}: use_learned_scale converts the trained '
                         'codes exactly; GPTQ (hessian) would change them. '
                         'Pass one or the other.')
    if use_learned_scale:
        wq = mod.weight_quant
        if wq is None or not bool(wq.initialized):
            raise RuntimeError(f'{name}: use_learned_scale needs a trained '
                               'weight quantizer (direct-QAT checkpoint).')
        if wq.cfg.bits != w_cfg.bits:
            raise ValueError(f'{name}: learned weight scale is for '
                             f'{wq.cfg.bits} bits, asked for {w_cfg.bits}.')
        learned = wq.scale
        # the learned scale belongs to the grid the layer trained on
        w_cfg = dataclasses.replace(w_cfg, fold=wq.cfg.fold,
                                    max_shift=wq.cfg.max_shift)
    shift = w_cfg.fold == 'pow2'
    if isinstance(mod, QLinear):
        out = IntQLinear(mod.in_features, mod.out_features, mod.bias is not None,
                         aq.cfg, w_cfg.bits, name, shift=shift)
    elif isinstance(mod, QConv2d):
        out = IntQConv2d(mod, aq.cfg, w_cfg.bits, name, shift=shift)
    else:
        raise TypeError(f'{name}: cannot convert {type(mod).__name__}')
    out.act_quant.load_state_dict(aq.state_dict())
    codes, scale, e = fold_and_quantize_weight(mod.weight, aq.scale, w_cfg,
                                               learned, hessian)
    out.set_weight_codes(codes, scale, e)
    if mod.bias is not None:
        out.bias.data.copy_(mod.bias.detach())
    return out.to(mod.weight.device)


def set_int_gemm(model: nn.Module, backend: str) -> int:
    """Choose the integer GEMM of every :class:`IntQLinear` in ``model``.

    ``backend``: ``'auto'`` (default: oneDNN int8 where it runs, else the
    float reference with a log line), ``'onednn'`` (raise where it cannot
    run) or ``'reference'``.  All give the same bits.  Returns the number of
    layers set.
    """
    if backend not in IG.BACKENDS:
        raise ValueError(f'int_gemm={backend!r}: choose one of {IG.BACKENDS}.')
    n = 0
    for m in model.modules():
        if isinstance(m, IntQLinear):
            m.int_gemm = backend
            n += 1
    return n
