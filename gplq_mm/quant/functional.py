"""Pure numeric quantization functions (torch only, no mm* imports).

Conventions: a scale tensor is broadcastable against the tensor it quantizes
(see :func:`scale_view`); integer codes are held in float tensors unless packed.
"""
import math
import threading
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


# -- scratch workspace ---------------------------------------------------------
# The fused paths below (lsq_linear, lsq_conv2d, quant_attention, LSQ backward)
# keep their temporaries in per-thread scratch buffers that live across calls.
# On CPU every fresh multi-MB tensor costs page faults, and glibc leaves the
# freed temporaries as holes between long-lived activations, which raises the
# RSS peak of a training step by ~10% although no more tensors are alive.
# Reusing a few buffers (a few MiB in total, bounded by the chunk sizes below)
# removes both.  Set WORKSPACE = False to allocate every temporary afresh.
WORKSPACE = True
WORKSPACE_MAX_ELEMS = 1 << 20  # larger temporaries are allocated normally
_WS = threading.local()


def _scratch(slot: str, shape, dtype, device) -> Tensor:
    """A scratch tensor for ``slot`` (CPU: reused across calls; never
    returned to callers nor saved for backward)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if not WORKSPACE or device.type != 'cpu' or n > WORKSPACE_MAX_ELEMS:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_WS, 'bufs', None)
    if bufs is None:
        bufs = _WS.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        bufs.pop((slot, dtype), None)  # free the old one before growing
        buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def clear_workspace() -> None:
    """Free this thread's scratch buffers (rebuilt on demand)."""
    _WS.bufs = {}


def _fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int,
                inplace: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` with at most one allocation.

    Bitwise equal to the out-of-place expression: the same four operations in
    the same order, done in place on one buffer (CPU elementwise passes are
    memory bound, and every fresh full-size temporary costs page faults).
    ``inplace=True`` reuses ``x`` itself when the result has its dtype/shape;
    ``out``: write the result there.
    """
    if out is not None:
        r = torch.div(x, scale, out=out)
    elif inplace and torch.result_type(x, scale) == x.dtype and \
            torch.broadcast_shapes(x.shape, scale.shape) == x.shape:
        r = x.div_(scale)
    else:
        r = torch.div(x, scale)
    return r.round_().clamp_(qmin, qmax).mul_(scale)


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
    if out is not None:
        r = torch.div(x, scale, out=out)
    elif inplace and torch.result_type(x, scale) == x.dtype and \
            torch.broadcast_shapes(x.shape, scale.shape) == x.shape:
        r = x.div_(scale)
    else:
        r = torch.div(x, scale)
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


_INT4_PAIRS = {}


def unpack_int4_float(packed: Tensor, length: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """``unpack_int4(packed, length).to(dtype)`` with two allocations.

    Each byte is looked up in a 256 x 2 table of its (low, high) codes, so
    the integer layers do not build five int16/int8 temporaries of the
    weight's size on every forward.
    """
    if not 0 <= length <= 2 * packed.shape[-1]:
        raise ValueError(f'unpack_int4: length {length} does not fit in '
                         f'{packed.shape[-1]} packed bytes (2 codes each).')
    key = (dtype, packed.device)
    lut = _INT4_PAIRS.get(key)
    if lut is None:
        b = torch.arange(256)
        lut = torch.stack([b & 0xF, b >> 4], dim=1)
        lut = torch.where(lut > 7, lut - 16, lut).to(dtype).to(packed.device)
        _INT4_PAIRS[key] = lut
    out = torch.nn.functional.embedding(packed.to(torch.int32), lut)
    out = out.flatten(-2)
    return out if out.shape[-1] == length else out[..., :length]


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


# Rows of ``x`` per chunk in the fused Linear: about this many elements, so
# the quantized copy and the backward temporaries stay a few MiB whatever the
# batch (no full-size temporaries: less peak memory, less heap fragmentation).
LINEAR_CHUNK_ELEMS = 1 << 18


def _chunks(rows: int, step: int):
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


class _LSQLinear(torch.autograd.Function):
    """``linear(fake_quant_lsq(x), w, b)`` saving only ``x``, ``scale``, ``w``.

    The quantized input is recomputed in backward, so Act-QAT keeps one copy
    of each activation (the FP32 input) like FP32 training does, instead of
    the FP32 input plus its quantized copy.  Forward and backward run over
    row chunks of ``x`` (:data:`LINEAR_CHUNK_ELEMS`) in scratch buffers, so
    nothing full-size is allocated besides the output and ``grad_x``.  The
    weight gradient is taken on the integer codes and rescaled per input
    channel once (``g^T (q s) = (g^T q) s``).
    """

    @staticmethod
    def forward(ctx, x, scale, weight, bias, qmin, qmax, grad_factor):
        ctx.save_for_backward(x, scale, weight)
        ctx.q = (qmin, qmax, grad_factor, bias is not None)
        x2 = x.reshape(-1, x.shape[-1])
        rows, cols = x2.shape
        dt = torch.result_type(x2, scale)
        step = max(1, LINEAR_CHUNK_ELEMS // max(cols, 1))
        if rows <= step:
            xq = _fake_quant(x, scale, qmin, qmax, out=_scratch(
                'lin.xq', torch.broadcast_shapes(x.shape, scale.shape), dt,
                x.device))
            return torch.nn.functional.linear(xq, weight, bias)
        # allocated in its final shape: a reshaped view as the output of a
        # custom Function could not be modified in place (e.g. ReLU(inplace))
        out = x2.new_empty(x.shape[:-1] + weight.shape[:1], dtype=dt)
        out2 = out.view(rows, weight.shape[0])
        wt = weight.t()
        for i, j in _chunks(rows, step):
            xq = _fake_quant(x2[i:j], scale, qmin, qmax, out=_scratch(
                'lin.xq', (j - i, cols), dt, x.device))
            if bias is None:
                torch.mm(xq, wt, out=out2[i:j])
            else:
                torch.addmm(bias, xq, wt, out=out2[i:j])
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, weight = ctx.saved_tensors
        qmin, qmax, grad_factor, has_bias = ctx.q
        grad_w = grad_b = grad_x = grad_s = None
        need_x, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        if has_bias and need_b:
            grad_b = g2.sum(0)
        if not (need_x or need_s or need_w):
            return grad_x, grad_s, grad_w, grad_b, None, None, None
        x2 = x.reshape(-1, x.shape[-1])
        rows, cols = x2.shape
        step = max(1, LINEAR_CHUNK_ELEMS // max(cols, 1))
        w = weight.to(grad.dtype)
        if need_x:
            grad_x = grad.new_empty((rows, cols))
        if need_w:
            grad_w = g2.new_empty((g2.shape[1], cols))
        for n, (i, j) in enumerate(_chunks(rows, step)):
            mask, c = _ratio_and_mask(x2[i:j], scale, qmin, qmax, ws='lin')
            cm = torch.mul(mask, c, out=_scratch('lin.cm', c.shape, c.dtype,
                                                 c.device)) if need_s else None
            c.round_()  # integer codes
            if need_w:
                cg = c if c.dtype == g2.dtype else c.to(g2.dtype)
                if n == 0:
                    torch.mm(g2[i:j].t(), cg, out=grad_w)
                else:
                    grad_w.addmm_(g2[i:j].t(), cg)
            if need_x or need_s:
                grad_xq = torch.mm(
                    g2[i:j], w, out=grad_x[i:j] if need_x else _scratch(
                        'lin.gxq', (j - i, cols), grad.dtype, grad.device))
                if need_s:
                    gs = _lsq_scale_grad(grad_xq, mask, c, scale, 1.0,
                                         codes_done=True, cm=cm)
                    grad_s = gs if grad_s is None else grad_s.add_(gs)
                if need_x:
                    grad_xq.mul_(mask)
        if need_w:
            grad_w.mul_(scale)
        if need_s:
            grad_s = grad_s * grad_factor
        if need_x:
            grad_x = grad_x.reshape(x.shape)
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


class _LSQConv2d(torch.autograd.Function):
    """``conv2d(fake_quant_lsq(x), w, b)`` saving only ``x``, ``scale``, ``w``.

    As :class:`_LSQLinear` for a zero-padded ``Conv2d`` whose input is
    quantized per input channel (scale ``[C]`` along axis 1) or per tensor;
    the quantized input and the backward temporaries live in scratch buffers.
    """

    @staticmethod
    def forward(ctx, x, scale, weight, bias, stride, padding, dilation, groups,
                qmin, qmax, grad_factor):
        s = scale_view(scale, x.ndim, 1)
        ctx.save_for_backward(x, scale, weight)
        ctx.q = (qmin, qmax, grad_factor, bias is not None, stride, padding,
                 dilation, groups)
        xq = _fake_quant(x, s, qmin, qmax, out=_scratch(
            'conv.xq', torch.broadcast_shapes(x.shape, s.shape),
            torch.result_type(x, s), x.device))
        return torch.nn.functional.conv2d(xq, weight, bias, stride, padding,
                                          dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, scale, weight = ctx.saved_tensors
        (qmin, qmax, grad_factor, has_bias, stride, padding, dilation,
         groups) = ctx.q
        need_x, need_s, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_s = grad_w = grad_b = None
        if not (need_x or need_s or need_w or need_b):
            return (None, ) * 11
        s = scale_view(scale, x.ndim, 1)
        mask, c = _ratio_and_mask(x, s, qmin, qmax, ws='conv')
        cm = torch.mul(mask, c, out=_scratch('conv.cm', c.shape, c.dtype,
                                             c.device)) if need_s else None
        c.round_()  # integer codes
        gin, gw, gb = torch.ops.aten.convolution_backward(
            grad, c.to(grad.dtype), weight.to(grad.dtype),
            [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0, 0], groups,
            [need_x or need_s, need_w, has_bias and need_b])
        if need_w:
            # d/dW of conv(q * s) = (d/dW of conv(q)) * s[input channel]
            sw = s.reshape(-1)
            if sw.numel() > 1:
                cin_g = weight.shape[1]
                sw = sw.reshape(groups, 1, cin_g).expand(
                    groups, weight.shape[0] // groups, cin_g).reshape(
                        weight.shape[0], cin_g, 1, 1)
            else:
                sw = sw.reshape(())
            grad_w = gw.mul_(sw)
        if has_bias and need_b:
            grad_b = gb
        if need_s:
            grad_s = _lsq_scale_grad(gin, mask, c, s, grad_factor,
                                     codes_done=True, cm=cm)
            grad_s = grad_s.reshape(scale.shape)
        if need_x:
            grad_x = gin.mul_(mask)
        return (grad_x, grad_s, grad_w, grad_b) + (None, ) * 7


def lsq_conv2d(x: Tensor, scale: Tensor, weight: Tensor,
               bias: Optional[Tensor], stride, padding, dilation, groups: int,
               qmin: int, qmax: int,
               grad_factor: Optional[float] = None) -> Tensor:
    """Memory-lean ``F.conv2d(fake_quantize_lsq(x, s), weight, bias, ...)``.

    ``scale``: ``[C_in]`` (per input channel, axis 1 of ``x``) or a single
    value.  Zero padding only (``padding`` as numbers, not a string).
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x.numel(), scale.numel(), qmax)
    return _LSQConv2d.apply(x, scale, weight, bias, _pair(stride),
                            _pair(padding), _pair(dilation), groups, qmin,
                            qmax, grad_factor)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# Attention batch entries per chunk: about this many elements of the
# [b, h, N, N] probabilities (2 MiB in float32), a multiple of the window
# count when a shifted-window mask is used.
ATTN_CHUNK_ELEMS = 1 << 19


def _attn_step(q: Tensor, k: Tensor, nw: Optional[int]) -> int:
    per = max(q.shape[1] * q.shape[2] * k.shape[2], 1)
    step = max(1, ATTN_CHUNK_ELEMS // per)
    if nw:
        step = max(nw, step // nw * nw)
    return step


class _QuantAttention(torch.autograd.Function):
    """Quantized attention core that recomputes its internals in backward.

    ``out = Qp(softmax(Qq(q * mult) @ Qk(k)^T + bias [+ mask])) @ Qv(v)``
    with LSQ quantizers ``Qq, Qk, Qv`` (any granularity; ``None`` = float)
    and a post-softmax quantizer ``Qp`` (log-sqrt2 with a straight-through
    gradient, or LSQ uniform).  Only ``q, k, v`` (views of the qkv output,
    which FP32 attention keeps as well), the scales and the bias are saved:
    the quantized copies of q/k/v, the ``[B, h, N, N]`` logits, softmax output
    and quantized probabilities are rebuilt in backward, chunk by chunk along
    the batch (:data:`ATTN_CHUNK_ELEMS`) in scratch buffers, so Act-QAT
    attention holds no more activations than FP32 (flash) attention and
    allocates nothing full-size but its output and gradients.  All inputs
    share one dtype (checked by :func:`quant_attention`).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, sq, sk, sv, sp, spec):
        ctx.save_for_backward(q, k, v, bias, sq, sk, sv, sp)
        ctx.spec = spec
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        for i, j in _chunks(q.shape[0], _attn_step(q, k, spec[6])):
            _attn_forward(q[i:j], k[i:j], v[i:j], bias, sq, sk, sv, sp, spec,
                          out=out[i:j])
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, sq, sk, sv, sp = ctx.saved_tensors
        spec = ctx.spec
        need = ctx.needs_input_grad
        grads = {name: grad.new_empty(t.shape) if n else None
                 for name, t, n in (('q', q, need[0]), ('k', k, need[1]),
                                    ('v', v, need[2]))}
        # scale/bias gradients accumulate in buffers made up front
        acc = [None if t is None or not n else torch.zeros_like(t)
               for t, n in ((bias, need[3]), (sq, need[4]), (sk, need[5]),
                            (sv, need[6]), (sp, need[7]))]
        for i, j in _chunks(q.shape[0], _attn_step(q, k, spec[6])):
            outs = {n: None if g is None else g[i:j] for n, g in grads.items()}
            small = _attn_backward(grad[i:j], q[i:j], k[i:j], v[i:j], bias,
                                   sq, sk, sv, sp, spec, need, outs)
            for n, g in enumerate(small):
                if g is not None:
                    acc[n].add_(g)
        return (grads['q'], grads['k'], grads['v'], acc[0], acc[1], acc[2],
                acc[3], acc[4], None)


def _attn_backward(grad, q, k, v, bias, sq, sk, sv, sp, spec, need, outs):
    """One batch chunk: recompute its forward, write the q/k/v gradients into
    ``outs`` and return ``(bias, sq, sk, sv, sp)`` gradients of the chunk."""
    mult, qs, ks, vs, ps, mask, nw = spec
    _, qq, kq, vq, p, pq = _attn_forward(q, k, v, bias, sq, sk, sv, sp, spec,
                                         keep=True)

    def scratch(slot, shape):
        return _scratch(slot, shape, q.dtype, q.device)

    g_bias = g_sq = g_sk = g_sv = g_sp = None
    g_pq = torch.matmul(grad, vq.transpose(-2, -1),
                        out=scratch('att.gpq', p.shape))
    if need[2] or need[6]:
        g_vq = torch.matmul(pq.transpose(-2, -1), grad,
                            out=scratch('att.g', v.shape))
        g_sv = _quant_input_grad(g_vq, v, sv, vs, need[6], outs['v'])
    if ps is not None and ps[0] == 'uniform':
        g_p, g_sp = _lsq_backward(g_pq, p, sp, ps[1], ps[2], ps[3], need[7],
                                  out=scratch('att.gp', p.shape),
                                  ws='att.lsqp')
    else:
        g_p = g_pq  # log-sqrt2: straight through
    g_attn = torch.ops.aten._softmax_backward_data.out(
        g_p, p, -1, p.dtype, grad_input=scratch('att.gattn', p.shape))
    if bias is not None and need[3]:
        g_bias = g_attn.sum_to_size(bias.shape)
    if need[1] or need[5]:
        g_kq = torch.matmul(g_attn.transpose(-2, -1), qq,
                            out=scratch('att.g', k.shape))
        g_sk = _quant_input_grad(g_kq, k, sk, ks, need[5], outs['k'])
    if need[0] or need[4]:
        g_qq = torch.matmul(g_attn, kq, out=scratch('att.g', q.shape))
        qm = torch.mul(q, mult, out=scratch('att.qq', q.shape))  # qq is done
        g_sq = _quant_input_grad(g_qq, qm, sq, qs, need[4], outs['q'])
        if outs['q'] is not None:
            outs['q'].mul_(mult)
    return g_bias, g_sq, g_sk, g_sv, g_sp


def _quant_input_grad(grad, x, scale, spec, need_scale, out):
    """Input gradient of a (possibly absent) LSQ quantizer written into
    ``out`` (``None``: not needed); returns the scale gradient."""
    if spec is None:
        if out is not None:
            out.copy_(grad)
        return None
    return _lsq_backward(grad, x, scale, spec[0], spec[1], spec[2], need_scale,
                         need_x=out is not None, out=out, ws='att.lsq')[1]


def _attn_forward(q, k, v, bias, sq, sk, sv, sp, spec, keep: bool = False,
                  out: Optional[Tensor] = None):
    """Forward of :class:`_QuantAttention`, bitwise equal to the unfused ops.

    Temporaries are scratch buffers.  ``keep``: also return the quantized
    inputs, the softmax output and the quantized probabilities (views of
    scratch buffers, for backward).  ``out``: write the result there.
    """
    mult, qs, ks, vs, ps, mask, nw = spec

    def scratch(slot, shape):
        return _scratch(slot, shape, q.dtype, q.device)

    b_, h, n = q.shape[:3]
    m = k.shape[2]
    qq = torch.mul(q, mult, out=scratch('att.qq', q.shape))
    if qs is not None:
        qq = _fake_quant(qq, sq, qs[0], qs[1], inplace=True)
    kq = k if ks is None else _fake_quant(k, sk, ks[0], ks[1],
                                          out=scratch('att.kq', k.shape))
    vq = v if vs is None else _fake_quant(v, sv, vs[0], vs[1],
                                          out=scratch('att.vq', v.shape))
    attn = torch.matmul(qq, kq.transpose(-2, -1),
                        out=scratch('att.logits', (b_, h, n, m)))
    if bias is not None:
        attn.add_(bias)
    if mask is not None:
        attn.view(b_ // nw, nw, h, n, m).add_(mask.unsqueeze(1).unsqueeze(0))
    p = torch.ops.aten._softmax.out(attn, -1, False,
                                    out=scratch('att.p', attn.shape))
    dst = scratch('att.pq', p.shape) if keep else p
    if ps is None:
        pq = p
    elif ps[0] == 'log2':
        pq = _log2_fake_quant(p, sp, ps[1], scratch=attn, out=dst)
    else:
        pq = _fake_quant(p, sp, ps[1], ps[2], out=dst)
    o = torch.matmul(pq, vq, out=out) if out is not None else pq.matmul(vq)
    if not keep:
        return o, None, None, None, None, None
    return o, qq, kq, vq, p, pq


def quant_attention(q: Tensor, k: Tensor, v: Tensor, mult: float,
                    q_quant=None, k_quant=None, v_quant=None, p_quant=None,
                    bias: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None) -> Tensor:
    """``Qp(softmax(Qq(q * mult) @ Qk(k)^T + bias [+ mask])) @ Qv(v)``.

    Args:
        q, k, v: ``[B, h, N, d]``.
        mult: Query scaling (``head_dim ** -0.5`` or the module's ``scale``).
        q_quant, k_quant, v_quant: ``None`` (float) or ``(scale, qmin, qmax)``
            with ``scale`` broadcastable to ``[B, h, N, d]`` (detach it to
            freeze it) and optionally a 4th entry, the LSQ gradient factor.
        p_quant: ``None``, ``('log2', scale, bits)`` (straight-through) or
            ``('uniform', scale, qmin, qmax[, grad_factor])``.
        bias: Added to the logits, broadcastable to ``[B, h, N, N]`` (e.g. a
            relative position bias ``[1, h, N, N]``); gets a gradient.
        mask: ``[nW, N, N]`` shifted-window mask (no gradient); the batch is
            ``B = batch * nW``, as in Swin's ``WindowMSA``.

    Returns:
        ``[B, h, N, d]``, equal to the unfused ops (forward bitwise, gradients
        up to float reassociation), with only ``q, k, v`` kept for backward.
    """
    def spec_of(qz, x):
        if qz is None:
            return None, None
        scale, qmin, qmax = qz[:3]
        gf = qz[3] if len(qz) > 3 else lsq_grad_factor(x.numel(),
                                                       scale.numel(), qmax)
        return scale, (qmin, qmax, gf)

    sq, qs = spec_of(q_quant, q)
    sk, ks = spec_of(k_quant, k)
    sv, vs = spec_of(v_quant, v)
    sp = ps = None
    if p_quant is not None:
        if p_quant[0] == 'log2':
            sp, ps = p_quant[1], ('log2', p_quant[2])
        elif p_quant[0] == 'uniform':
            sp = p_quant[1]
            qmin, qmax = p_quant[2], p_quant[3]
            b_, h, n = q.shape[0], q.shape[1], q.shape[2]
            gf = p_quant[4] if len(p_quant) > 4 else lsq_grad_factor(
                b_ * h * n * k.shape[2], sp.numel(), qmax)
            ps = ('uniform', qmin, qmax, gf)
        else:
            raise ValueError(f'p_quant kind {p_quant[0]!r}: use "log2" or '
                             '"uniform".')
    dtypes = {t.dtype for t in (q, k, v, bias, mask, sq, sk, sv, sp)
              if t is not None}
    if len(dtypes) > 1:
        raise ValueError('quant_attention: q, k, v, bias, mask and the scales '
                         f'must share one dtype, got {sorted(map(str, dtypes))}'
                         '; cast them (or use the op-by-op forward).')
    nw = None if mask is None else mask.shape[0]
    spec = (mult, qs, ks, vs, ps, mask, nw)
    return _QuantAttention.apply(q, k, v, bias, sq, sk, sv, sp, spec)


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
