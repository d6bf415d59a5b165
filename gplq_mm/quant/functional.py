"""Pure numeric quantization functions (torch only, no mm* imports).

Conventions: a scale tensor is broadcastable against the tensor it quantizes
(see :func:`scale_view`); integer codes are held in float tensors unless packed.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

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


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ fake quantization; saves only ``x`` and ``scale`` for backward."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.q = (qmin, qmax, grad_factor)
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

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
    """
    v = x / scale
    below = v < qmin
    above = v > qmax
    inside = ~(below | above)
    grad_x = grad * inside
    grad_s = None
    if need_scale_grad:
        ds = torch.where(below, torch.full_like(v, qmin),
                         torch.where(above, torch.full_like(v, qmax),
                                     torch.round(v) - v))
        grad_s = (grad * ds).sum_to_size(scale.shape) * grad_factor
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
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Fake quantization with STE for ``x`` and no gradient for the scale."""
    return _LSQFakeQuant.apply(x, scale.detach(), qmin, qmax, 0.0)


class _Log2FakeQuant(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, scale, bits):
        return log2_dequantize(log2_quantize(x, scale, bits), scale, bits)

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


def log2_dequantize(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    val = scale * torch.pow(2.0, -codes / 2.0)
    return torch.where(codes >= top, torch.zeros_like(val), val)


def fake_quantize_log2(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """log-sqrt2 fake quantization with a straight-through gradient."""
    return _Log2FakeQuant.apply(x, scale.detach(), bits)


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


def pack_int4(codes: Tensor) -> Tensor:
    """Pack signed 4-bit codes (values in [-8, 7]) two per uint8 along the last dim.

    An odd last dimension is padded with one zero code; :func:`unpack_int4`
    needs the original length to drop it.
    """
    c = codes.detach()
    if c.is_floating_point():
        c = c.round()
    # check before the integer cast: a cast would wrap e.g. 65539 to 3
    if not bool(((c >= -8) & (c <= 7)).all()):  # also rejects NaN
        raise ValueError('pack_int4 takes codes in [-8, 7]; quantize to 4 bits '
                         'before packing.')
    c = c.to(torch.int16)
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    u = (c & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, length: int) -> Tensor:
    """Inverse of :func:`pack_int4`; returns int8 codes with last dim ``length``."""
    if not 0 <= length <= 2 * packed.shape[-1]:
        raise ValueError(f'unpack_int4: length {length} does not fit in '
                         f'{packed.shape[-1]} packed bytes (2 codes each).')
    lo = (packed & 0xF).to(torch.int16)
    hi = ((packed >> 4) & 0xF).to(torch.int16)
    out = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :length]
    out = torch.where(out > 7, out - 16, out)
    return out.to(torch.int8)


class _LSQLinear(torch.autograd.Function):
    """``linear(fake_quant_lsq(x), w, b)`` saving only ``x``, ``scale``, ``w``.

    The quantized input is recomputed in backward, so Act-QAT keeps one copy
    of each activation (the FP32 input) like FP32 training does, instead of
    the FP32 input plus its quantized copy.
    """

    @staticmethod
    def forward(ctx, x, scale, weight, bias, qmin, qmax, grad_factor):
        xq = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
        ctx.save_for_backward(x, scale, weight)
        ctx.q = (qmin, qmax, grad_factor, bias is not None)
        return torch.nn.functional.linear(xq, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, scale, weight = ctx.saved_tensors
        qmin, qmax, grad_factor, has_bias = ctx.q
        grad_w = grad_b = None
        need_x, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        if need_w:
            xq = torch.clamp(torch.round(x / scale), qmin, qmax) * scale
            grad_w = g2.t().mm(xq.reshape(-1, xq.shape[-1]).to(g2.dtype))
            del xq
        if has_bias and need_b:
            grad_b = g2.sum(0)
        grad_x = grad_s = None
        if need_x or need_s:
            grad_xq = grad.matmul(weight.to(grad.dtype))
            grad_x, grad_s = lsq_backward(grad_xq, x, scale, qmin, qmax,
                                          grad_factor, need_s)
        return grad_x, grad_s, grad_w, grad_b, None, None, None


def lsq_linear(x: Tensor, scale: Tensor, weight: Tensor, bias: Optional[Tensor],
               qmin: int, qmax: int,
               grad_factor: Optional[float] = None) -> Tensor:
    """Memory-lean ``F.linear(fake_quantize_lsq(x, scale), weight, bias)``.

    ``scale`` must broadcast along the last axis of ``x`` (per input channel or
    per tensor). Pass ``scale.detach()`` to freeze it.
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel(), scale.numel(), qmax)
    return _LSQLinear.apply(x, scale, weight, bias, qmin, qmax, grad_factor)


def percentile_from_histogram(hist: Tensor, edges_lo: Tensor, width: Tensor,
                              q: Sequence[float]) -> Tuple[Tensor, ...]:
    """Percentiles (numpy 'linear', within one bin width) from per-row histograms.

    As ``numpy.percentile``: the value at fractional rank ``h = (n-1) p/100``
    interpolated between the order statistics of rank ``floor(h)`` and
    ``floor(h)+1``.  Each order statistic is located in its bin (estimated
    inside that bin), so each is off by less than one bin width, and so is the
    interpolation of the two, even across empty bins (outliers).

    Args:
        hist: ``[C, B]`` counts.
        edges_lo: ``[C]`` lower edge of bin 0 for each row.
        width: ``[C]`` bin width for each row.
        q: Percentiles in [0, 100].
    """
    hist = hist.double()
    edges_lo, width = edges_lo.double(), width.double()
    nbins = hist.shape[1]
    cdf = hist.cumsum(dim=1)
    last = (cdf[:, -1:] - 1).clamp_min(0)  # rank of the largest value

    def order_stat(k: Tensor) -> Tensor:
        # bin of the value of rank k (0-based): first bin with cdf > k
        idx = torch.searchsorted(cdf, k, right=True).clamp(max=nbins - 1)
        prev = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp_min(0)),
                           torch.zeros_like(k))
        cnt = hist.gather(1, idx).clamp_min(1)
        # the values of a bin are spread evenly over it
        frac = ((k - prev + 0.5) / cnt).clamp(0, 1)
        return edges_lo + (idx[:, 0].double() + frac[:, 0]) * width

    outs = []
    for p in q:
        h = last * (p / 100.0)
        k0 = torch.floor(h)
        k1 = torch.minimum(k0 + 1, last)
        v0 = order_stat(k0)
        outs.append(v0 + (h - k0)[:, 0] * (order_stat(k1) - v0))
    return tuple(outs)
