"""Placeholder ops that mark quantization in an ONNX export.

Under ``torch.onnx.export`` (the TorchScript exporter) the quantized modules
call these functions instead of their fused kernels.  Each one computes
what the module computes (so tracing sees the right shapes and values) and
exports as one node of the ``gplq`` domain that carries the quantizer's
scales as inputs and its grid as attributes.  ``gplq_mm.deploy.onnx_export``
then rewrites every ``gplq`` node into standard opset-21 operators
(``QuantizeLinear``/``DequantizeLinear`` in INT4, ``MatMul``, ``Conv``,
elementwise ops), with the weight codes as INT4 initializers.

Nodes (inputs; attributes):

Every node carries ``name``, the activation quantizer's name (its module
path), which names the codes in the check against PyTorch.

* ``QDQ`` (x, scale; qmin, qmax, axis, kind, bits): an activation fake
  quantizer in FROZEN state.  ``axis = -1`` in the attribute means per
  tensor (a scalar scale); otherwise the non-negative axis of ``x``.
* ``IntLinear`` (x, act_scale, shift_mult, weight_codes, weight_scale,
  bias; qmin, qmax): :class:`~gplq_mm.quant.modules.IntQLinear`, i.e.
  ``d * ((round(x / s) * 2^e) @ Wc^T) + b``.
* ``IntConv`` (the same inputs; qmin, qmax, strides, pads, dilations,
  group): :class:`~gplq_mm.quant.modules.IntQConv2d`.

Imports torch only.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional as QF

DOMAIN = 'gplq'


def _const(t: Tensor) -> Tensor:
    """``t`` as a constant of the traced graph (a tensor computed from a
    parameter would be traced as ops on it).  The export runs on the CPU."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def _axis_attr(axis: Optional[int], ndim: int) -> int:
    return -1 if axis is None else axis % ndim


class _QDQ(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, axis, kind, bits, name):
        s = QF.scale_view(scale, x.ndim, None if axis < 0 else axis)
        if kind == 'log2':
            return QF.log2_dequantize(QF.log2_quantize(x, s, bits), s, bits)
        return QF.fake_quantize(x, s, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, qmin, qmax, axis, kind, bits, name):
        return g.op(f'{DOMAIN}::QDQ', x, scale, qmin_i=qmin, qmax_i=qmax,
                    axis_i=axis, kind_s=kind, bits_i=bits, name_s=name)


def qdq(x: Tensor, scale: Tensor, cfg, name: str = '') -> Tensor:
    """Export form of an :class:`ActQuantizer` in FROZEN state."""
    s = scale.detach().clamp_min(QF.MIN_SCALE).reshape(-1)
    axis = _axis_attr(cfg.axis if s.numel() > 1 else None, x.ndim)
    if axis < 0:
        s = s.reshape(())
    return _QDQ.apply(x, _const(s), cfg.qmin, cfg.qmax, axis, cfg.kind,
                      cfg.bits, name)


def _int_codes(x, act_scale, shift_mult, qmin, qmax, axis):
    s = QF.scale_view(act_scale, x.ndim, None if act_scale.ndim == 0
                      else axis)
    m = QF.scale_view(shift_mult, x.ndim, None if shift_mult.ndim == 0
                      else axis)
    return QF.quantize(x, s, qmin, qmax) * m


class _IntLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, act_scale, shift_mult, weight_codes, weight_scale,
                bias, qmin, qmax, name):
        xc = _int_codes(x, act_scale, shift_mult, qmin, qmax, -1)
        return F.linear(xc, weight_codes) * weight_scale + bias

    @staticmethod
    def symbolic(g, x, act_scale, shift_mult, weight_codes, weight_scale,
                 bias, qmin, qmax, name):
        return g.op(f'{DOMAIN}::IntLinear', x, act_scale, shift_mult,
                    weight_codes, weight_scale, bias, qmin_i=qmin,
                    qmax_i=qmax, name_s=name)


class _IntConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, act_scale, shift_mult, weight_codes, weight_scale,
                bias, qmin, qmax, name, stride, padding, dilation, groups):
        xc = _int_codes(x, act_scale, shift_mult, qmin, qmax, 1)
        y = F.conv2d(xc, weight_codes, None, stride, padding, dilation,
                     groups)
        return y * weight_scale.reshape(1, -1, 1, 1) + \
            bias.reshape(1, -1, 1, 1)

    @staticmethod
    def symbolic(g, x, act_scale, shift_mult, weight_codes, weight_scale,
                 bias, qmin, qmax, name, stride, padding, dilation, groups):
        return g.op(f'{DOMAIN}::IntConv', x, act_scale, shift_mult,
                    weight_codes, weight_scale, bias, qmin_i=qmin,
                    qmax_i=qmax, name_s=name, strides_i=list(stride),
                    pads_i=list(padding) * 2, dilations_i=list(dilation),
                    group_i=groups)


def _int_args(layer):
    aq = layer.act_quant
    s = aq.scale.detach().clamp_min(QF.MIN_SCALE).reshape(-1)
    if s.numel() == 1:
        s = s.reshape(())
    if layer.input_shift is None:
        mult = torch.ones((), dtype=s.dtype, device=s.device)
    else:
        mult = torch.exp2(layer.input_shift.to(s.dtype)).reshape(-1)
        if mult.numel() == 1:
            mult = mult.reshape(())
    w = layer.weight_codes()
    b = layer.bias.detach() if layer.bias is not None else \
        torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return _const(s), _const(mult), _const(w), _const(layer.weight_scale), \
        _const(b), aq.cfg.qmin, aq.cfg.qmax, aq.name


def int_linear(layer, x: Tensor) -> Tensor:
    """Export form of :class:`IntQLinear`."""
    return _IntLinear.apply(x, *_int_args(layer))


def int_conv(layer, x: Tensor) -> Tensor:
    """Export form of :class:`IntQConv2d`."""
    if isinstance(layer.padding, str):
        raise ValueError(f'{layer.act_quant.name}: padding={layer.padding!r} '
                         'cannot be exported; use explicit integer padding.')
    return _IntConv.apply(x, *_int_args(layer), tuple(layer.stride),
                          tuple(layer.padding), tuple(layer.dilation),
                          layer.groups)
