"""Quantization primitives: scales, (fake) quantization on the uniform and
log-sqrt2 grids, the LSQ gradient math and the weight-scale search (torch
only, no mm* imports).

Conventions: a scale tensor is broadcastable against the tensor it quantizes
(see :func:`scale_view`); integer codes are held in float tensors unless packed.
The fused autograd kernels built from these are in :mod:`.kernels`, int4
packing in :mod:`.int4`, scratch buffers in :mod:`.workspace`.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .workspace import _scratch

# Smallest scale we ever use: a zero or denormal scale would divide by zero.
MIN_SCALE = 1e-8


def scale_view(scale: Tensor, ndim: int, axis: Optional[int]) -> Tensor:
    """Reshape a 1-D scale so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None or scale.numel() == 1:
        return scale.reshape(())
    pos = axis if axis >= 0 else ndim + axis
    if not 0 <= pos < ndim:
        raise ValueError(f'axis {axis} does not exist for a {ndim}-D tensor.')
    return scale.reshape([-1] + [1] * (ndim - pos - 1))


def choose_qparams(absmax: Tensor, qmax: int) -> Tensor:
    """Symmetric scale that maps ``absmax`` to the largest code ``qmax``.

    Entries whose range is zero (a dead channel) or not finite get the median
    of the valid entries (1.0 if none is valid) instead of a zero/NaN scale.
    """
    absmax = absmax.detach().float()
    scale = absmax / qmax
    valid = torch.isfinite(scale) & (scale > MIN_SCALE)
    if not bool(valid.all()):
        fill = scale[valid].median() if bool(valid.any()) else scale.new_tensor(1.0)
        scale = torch.where(valid, scale, fill)
    return scale


def _div(x: Tensor, scale: Tensor, inplace: bool = False,
         out: Optional[Tensor] = None) -> Tensor:
    """``x / scale`` into ``out``, or in place in ``x`` when ``inplace`` and
    the result has ``x``'s dtype and shape, else into a new tensor."""
    if out is not None:
        return torch.div(x, scale, out=out)
    if inplace and torch.result_type(x, scale) == x.dtype and \
            torch.broadcast_shapes(x.shape, scale.shape) == x.shape:
        return x.div_(scale)
    return torch.div(x, scale)


def _fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int,
                inplace: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` with at most one allocation.

    Bitwise equal to the out-of-place expression: the same four operations in
    the same order, done in place on one buffer (CPU elementwise passes are
    memory bound, and every fresh full-size temporary costs page faults).
    ``inplace=True`` reuses ``x`` itself when the result has its dtype/shape;
    ``out``: write the result there.
    """
    return _div(x, scale, inplace, out).round_().clamp_(qmin, qmax).mul_(scale)


def _ratio_and_mask(x: Tensor, scale: Tensor, qmin: int, qmax: int,
                    ws: Optional[str] = None):
    """``(mask, c)`` with ``c = clamp(x / s, qmin, qmax)`` and ``mask`` the
    float indicator (1/0, dtype of ``c``) of ``qmin <= x / s <= qmax``.

    Two buffers (scratch slots ``ws.v``/``ws.c`` if ``ws`` is given); the
    comparison is written straight into the first one.
    """
    if ws is None:
        v = torch.div(x, scale)
        c = v.clamp(qmin, qmax)
    else:
        shape = torch.broadcast_shapes(x.shape, scale.shape)
        dt = torch.result_type(x, scale)
        v = torch.div(x, scale, out=_scratch(ws + '.v', shape, dt, x.device))
        c = torch.clamp(v, qmin, qmax,
                        out=_scratch(ws + '.c', shape, dt, x.device))
    torch.eq(c, v, out=v)  # inside <=> clamping changed nothing
    return v, c


def _lsq_scale_grad(grad: Tensor, mask: Tensor, c: Tensor, scale: Tensor,
                    grad_factor: float, codes_done: bool = False,
                    cm: Optional[Tensor] = None) -> Tensor:
    """LSQ scale gradient from ``mask``/``c`` of :func:`_ratio_and_mask`.

    ``ds = round(c) - c * mask`` equals the LSQ factor exactly: ``round(v) - v``
    inside, ``qmin``/``qmax`` below/above.  Destroys ``c`` (and ``mask`` unless
    ``cm = c * mask`` is passed in; with ``codes_done`` ``c`` already holds
    ``round(c)``).
    """
    if cm is None:
        cm = mask.mul_(c)
    if not codes_done:
        c.round_()
    ds = c.sub_(cm).mul_(grad)
    return ds.sum_to_size(scale.shape) * grad_factor


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ fake quantization; saves only ``x`` and ``scale`` for backward."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.q = (qmin, qmax, grad_factor)
        return _fake_quant(x, scale, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        qmin, qmax, grad_factor = ctx.q
        grad_x, grad_s = lsq_backward(grad, x, scale, qmin, qmax, grad_factor,
                                      ctx.needs_input_grad[1])
        return grad_x, grad_s, None, None, None


def lsq_backward(grad: Tensor, x: Tensor, scale: Tensor, qmin: int, qmax: int,
                 grad_factor: float, need_scale_grad: bool = True):
    """Gradients of LSQ fake quantization w.r.t. input and scale.

    Input: straight-through inside the clipping range, zero outside.
    Scale (Esser et al. 2019, eq. 3): ``round(v) - v`` inside, ``qmin``/``qmax``
    below/above, times ``grad_factor`` and summed to the scale's shape.

    Written for CPU memory traffic: the returned ``grad_x`` is the only new
    full-size tensor (two scratch buffers), no boolean or ``torch.where``
    intermediates.
    """
    return _lsq_backward(grad, x, scale, qmin, qmax, grad_factor,
                         need_scale_grad)


def _lsq_backward(grad, x, scale, qmin, qmax, grad_factor, need_scale_grad,
                  need_x: bool = True, out: Optional[Tensor] = None,
                  ws: str = 'lsq'):
    """:func:`lsq_backward` writing ``grad_x`` into ``out`` (if given)."""
    grad_x = None
    if need_x:  # the result first, the scratch buffers are reused
        grad_x = out if out is not None else torch.empty_like(
            grad, memory_format=torch.contiguous_format)
    mask, c = _ratio_and_mask(x, scale, qmin, qmax, ws=ws)
    grad_s = None
    if need_scale_grad:
        cm = torch.mul(mask, c, out=_scratch(ws + '.cm', c.shape, c.dtype,
                                             c.device)) if need_x else None
        grad_s = _lsq_scale_grad(grad, mask, c, scale, grad_factor, cm=cm)
    if need_x:
        torch.mul(grad, mask, out=grad_x)
    return grad_x, grad_s


def lsq_grad_factor(numel: int, num_scales: int, qmax: int) -> float:
    """LSQ gradient scale ``1/sqrt(N * Qp)``, N = elements per scale value."""
    per_scale = max(numel // max(num_scales, 1), 1)
    return 1.0 / math.sqrt(per_scale * max(qmax, 1))


def fake_quantize_lsq(x: Tensor, scale: Tensor, qmin: int, qmax: int,
                      grad_factor: Optional[float] = None) -> Tensor:
    """LSQ fake quantization ``clamp(round(x/s), qmin, qmax) * s``.

    Args:
        x: Input.
        scale: Positive scale broadcastable to ``x``.
        qmin, qmax: Integer grid bounds.
        grad_factor: LSQ gradient scale; default ``1/sqrt(N * qmax)`` with N
            the number of elements sharing one scale value.
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel(), scale.numel(), qmax)
    return _LSQFakeQuant.apply(x, scale, qmin, qmax, grad_factor)


def quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes (as float) ``clamp(round(x/s), qmin, qmax)``."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return torch.clamp(torch.round(x / scale), qmin, qmax)
    return torch.div(x, scale).round_().clamp_(qmin, qmax)  # one buffer


def fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Fake quantization with STE for ``x`` and no gradient for the scale."""
    return _LSQFakeQuant.apply(x, scale.detach(), qmin, qmax, 0.0)


def affine_qparams(lo: Tensor, hi: Tensor, qmax: int):
    """Scale and zero point of the asymmetric grid ``[0, qmax]`` spanning
    ``[lo, hi]`` (RepQ-ViT's ``UniformQuantizer``): ``s = (hi - lo) / qmax``,
    ``z = round(-lo / s)``; a zero range gets the smallest scale."""
    s = ((hi - lo).float() / qmax).clamp_min(MIN_SCALE)
    return s, torch.round(-lo.float() / s)


def fake_quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor,
                         qmax: int) -> Tensor:
    """``(clamp(round(x / s) + z, 0, qmax) - z) * s`` with a straight-through
    gradient for ``x`` (RepQ-ViT's order of operations: ``z`` may be
    fractional after its scale reparameterization)."""
    q = torch.clamp(torch.round(x.detach() / scale) + zero_point, 0, qmax)
    deq = (q - zero_point) * scale
    return x + (deq - x).detach() if x.requires_grad else deq


class _Log2FakeQuant(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, scale, bits):
        return _log2_fake_quant(x, scale, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def log2_quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """RepQ-ViT log-sqrt2 codes: ``k = round(-2 log2(x/s))`` in [0, 2^b-1].

    The top code ``2^b - 1`` stands for zero (values below the smallest level).
    """
    top = 2**bits - 1
    ratio = torch.clamp(x / scale, min=0.0)
    k = torch.round(-2.0 * torch.log2(ratio.clamp_min(1e-30)))
    k = torch.clamp(k, min=0.0)
    return torch.where((k >= top) | (ratio <= 0), torch.full_like(k, top), k)


def _exp2(t: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``2 ** t`` for the half-integer exponents of the log-sqrt2 grid.

    ``torch.exp2`` is ~10x faster than ``torch.pow(2.0, t)`` on CPU and gives
    the same bits for every exponent ``-k/2`` (k = 0..255) in float32,
    bfloat16 and float16 (checked exhaustively in the tests); float64 keeps
    ``pow``, whose vectorised path differs from ``exp2`` in the last bit.
    """
    if t.dtype == torch.float64:
        return torch.pow(2.0, t, out=out) if out is not None \
            else torch.pow(2.0, t)
    return torch.exp2(t, out=out) if out is not None else torch.exp2(t)


def log2_dequantize(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    val = scale * _exp2(-codes / 2.0)
    return torch.where(codes >= top, torch.zeros_like(val), val)


def _log2_fake_quant(x: Tensor, scale: Tensor, bits: int,
                     inplace: bool = False,
                     scratch: Optional[Tensor] = None,
                     out: Optional[Tensor] = None) -> Tensor:
    """``log2_dequantize(log2_quantize(x, s, b), s, b)`` on one buffer.

    The same operations in the same order (bitwise equal), in place; the
    zero mask is a float multiplier instead of ``torch.where`` chains,
    written into ``scratch`` (a free buffer of the result's shape and dtype)
    when one is given.  ``out``: write the result there.
    """
    top = 2**bits - 1
    r = _div(x, scale, inplace, out)
    # ratio <= 0 maps to k = round(-2 log2(1e-30)) = 199 >= top for
    # bits <= 7, i.e. to zero anyway; 8 bits needs the explicit test
    keep = torch.gt(r, 0, out=torch.empty_like(r)) if top > 199 else None
    k = r.clamp_(min=1e-30).log2_().mul_(-2.0).round_().clamp_(min=0.0)
    if scratch is None or scratch.shape != k.shape or \
            scratch.dtype != k.dtype:
        scratch = torch.empty_like(k)
    below_top = torch.lt(k, top, out=scratch)  # 1.0 / 0.0
    if keep is not None:
        below_top.mul_(keep)
    val = _exp2(k.mul_(-0.5), out=k).mul_(scale)
    return val.mul_(below_top)


def fake_quantize_log2(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """log-sqrt2 fake quantization with a straight-through gradient."""
    return _Log2FakeQuant.apply(x, scale.detach(), bits)


def split_pow2(scale: Tensor, max_shift: int):
    """Split per-channel activation scales into ``t * 2^e`` (exactly).

    ``e`` are integer shifts in ``[0, max_shift]``, anchored at the largest
    scale: ``e = round(log2(s / (max(s) / 2^max_shift)))``, clamped, then
    lowered by their minimum (the smallest shift is 0, so no width is spent
    where all channels agree, e.g. the three RGB channels).  A code ``q`` of
    channel c then equals ``(q << e_c) * t_c``; the shift is an exact integer
    op and only ``t`` is folded into the weight: for every channel not clamped
    at 0, ``t`` is within a factor sqrt(2) of one common value (so ``t``
    spans at most a factor 2 there).  Channels ``2^max_shift`` times below the
    largest keep the rest of their scale in ``t``.

    Returns:
        ``(t, e)``: float tensors shaped like ``scale`` (``e`` holds integers).
    """
    s = scale.detach().float().clamp_min(MIN_SCALE)
    if max_shift == 0 or s.numel() == 1:
        return s, torch.zeros_like(s)
    ref = s.max() / 2.0**max_shift
    e = torch.log2(s / ref).round_().clamp_(0, max_shift)
    e = e - e.min()
    return s / torch.exp2(e), e


def search_weight_scale(weight: Tensor, qmin: int, qmax: int, axis: int = 0,
                        min_ratio: float = 0.5,
                        num_candidates: int = 51) -> Tensor:
    """Per-channel symmetric scale minimising ``||W - Q(W)||^2`` per channel.

    Tries clipping ratios ``linspace(min_ratio, 1, num_candidates)`` of each
    channel's abs-max; with ``num_candidates=1`` this is plain abs-max.

    Returns:
        Scale of shape ``[weight.shape[axis]]``.
    """
    w = weight.detach().float().movedim(axis, 0).flatten(1)
    absmax = w.abs().amax(dim=1)
    base = choose_qparams(absmax, qmax)
    if num_candidates <= 1:
        return base
    best_err = torch.full_like(base, float('inf'))
    best = base.clone()
    for r in torch.linspace(min_ratio, 1.0, num_candidates).tolist():
        s = (base * r).clamp_min(MIN_SCALE)[:, None]
        err = ((quantize(w, s, qmin, qmax) * s - w)**2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best
