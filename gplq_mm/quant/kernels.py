"""Fused autograd kernels of Act-QAT: LSQ-quantized Linear, Conv2d and
attention that recompute their quantized inputs in backward.

Each kernel is bitwise equal in forward to the op-by-op composition of
:mod:`.functional` primitives and keeps its temporaries in
:mod:`.workspace` buffers.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .functional import (_fake_quant, _log2_fake_quant, _lsq_backward,
                         _lsq_scale_grad, _ratio_and_mask, lsq_grad_factor,
                         scale_view)
from .workspace import _scratch

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


@dataclass(frozen=True)
class GridSpec:
    """The integer grid of one LSQ quantizer inside the attention core."""
    qmin: int
    qmax: int
    grad_factor: float


@dataclass(frozen=True)
class ProbSpec:
    """The post-softmax quantizer: ``kind`` 'log2' (log-sqrt2 grid of
    ``bits``, straight-through gradient) or 'uniform' (LSQ on ``grid``)."""
    kind: str
    bits: int = 0
    grid: Optional[GridSpec] = None


@dataclass(frozen=True, eq=False)
class AttnSpec:
    """Everything of :class:`_QuantAttention` that is not a tensor input
    with a gradient: the query multiplier, the grids of the q/k/v/p
    quantizers (``None``: float) and the shifted-window mask."""
    mult: float
    q: Optional[GridSpec]
    k: Optional[GridSpec]
    v: Optional[GridSpec]
    p: Optional[ProbSpec]
    mask: Optional[Tensor] = None

    @property
    def num_windows(self) -> Optional[int]:
        return None if self.mask is None else self.mask.shape[0]


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

    Scales are ``scale_q, scale_k, scale_v, scale_p`` (tensors, for
    autograd); their grids are ``spec.q, spec.k, spec.v, spec.p``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale_q, scale_k, scale_v, scale_p,
                spec: AttnSpec):
        ctx.save_for_backward(q, k, v, bias, scale_q, scale_k, scale_v,
                              scale_p)
        ctx.spec = spec
        scales = (scale_q, scale_k, scale_v, scale_p)
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        for i, j in _chunks(q.shape[0], _attn_step(q, k, spec.num_windows)):
            _attn_forward(q[i:j], k[i:j], v[i:j], bias, scales, spec,
                          out=out[i:j])
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, *scales = ctx.saved_tensors
        spec = ctx.spec
        need = ctx.needs_input_grad
        grads = {name: grad.new_empty(t.shape) if n else None
                 for name, t, n in (('q', q, need[0]), ('k', k, need[1]),
                                    ('v', v, need[2]))}
        # bias/scale gradients accumulate in buffers made up front
        acc = [None if t is None or not n else torch.zeros_like(t)
               for t, n in zip([bias] + scales, need[3:8])]
        for i, j in _chunks(q.shape[0], _attn_step(q, k, spec.num_windows)):
            outs = {n: None if g is None else g[i:j] for n, g in grads.items()}
            small = _attn_backward(grad[i:j], q[i:j], k[i:j], v[i:j], bias,
                                   scales, spec, need, outs)
            for n, g in enumerate(small):
                if g is not None:
                    acc[n].add_(g)
        return (grads['q'], grads['k'], grads['v'], acc[0], acc[1], acc[2],
                acc[3], acc[4], None)


def _attn_backward(grad, q, k, v, bias, scales, spec: AttnSpec, need, outs):
    """One batch chunk: recompute its forward, write the q/k/v gradients into
    ``outs`` and return the ``(bias, scale_q, scale_k, scale_v, scale_p)``
    gradients of the chunk."""
    scale_q, scale_k, scale_v, scale_p = scales
    _, qq, kq, vq, p, pq = _attn_forward(q, k, v, bias, scales, spec,
                                         keep=True)

    def scratch(slot, shape):
        return _scratch(slot, shape, q.dtype, q.device)

    g_bias = g_sq = g_sk = g_sv = g_sp = None
    g_pq = torch.matmul(grad, vq.transpose(-2, -1),
                        out=scratch('att.gpq', p.shape))
    if need[2] or need[6]:
        g_vq = torch.matmul(pq.transpose(-2, -1), grad,
                            out=scratch('att.g', v.shape))
        g_sv = _quant_input_grad(g_vq, v, scale_v, spec.v, need[6], outs['v'])
    if spec.p is not None and spec.p.kind == 'uniform':
        g = spec.p.grid
        g_p, g_sp = _lsq_backward(g_pq, p, scale_p, g.qmin, g.qmax,
                                  g.grad_factor, need[7],
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
        g_sk = _quant_input_grad(g_kq, k, scale_k, spec.k, need[5], outs['k'])
    if need[0] or need[4]:
        g_qq = torch.matmul(g_attn, kq, out=scratch('att.g', q.shape))
        qm = torch.mul(q, spec.mult, out=scratch('att.qq', q.shape))  # qq is done
        g_sq = _quant_input_grad(g_qq, qm, scale_q, spec.q, need[4],
                                 outs['q'])
        if outs['q'] is not None:
            outs['q'].mul_(spec.mult)
    return g_bias, g_sq, g_sk, g_sv, g_sp


def _quant_input_grad(grad, x, scale, grid: Optional[GridSpec], need_scale,
                      out):
    """Input gradient of a (possibly absent) LSQ quantizer written into
    ``out`` (``None``: not needed); returns the scale gradient."""
    if grid is None:
        if out is not None:
            out.copy_(grad)
        return None
    return _lsq_backward(grad, x, scale, grid.qmin, grid.qmax,
                         grid.grad_factor, need_scale,
                         need_x=out is not None, out=out, ws='att.lsq')[1]


def _attn_forward(q, k, v, bias, scales, spec: AttnSpec, keep: bool = False,
                  out: Optional[Tensor] = None):
    """Forward of :class:`_QuantAttention`, bitwise equal to the unfused ops.

    Temporaries are scratch buffers.  ``keep``: also return the quantized
    inputs, the softmax output and the quantized probabilities (views of
    scratch buffers, for backward).  ``out``: write the result there.
    """
    scale_q, scale_k, scale_v, scale_p = scales

    def scratch(slot, shape):
        return _scratch(slot, shape, q.dtype, q.device)

    b_, h, n = q.shape[:3]
    m = k.shape[2]
    qq = torch.mul(q, spec.mult, out=scratch('att.qq', q.shape))
    if spec.q is not None:
        qq = _fake_quant(qq, scale_q, spec.q.qmin, spec.q.qmax, inplace=True)
    kq = k if spec.k is None else _fake_quant(
        k, scale_k, spec.k.qmin, spec.k.qmax, out=scratch('att.kq', k.shape))
    vq = v if spec.v is None else _fake_quant(
        v, scale_v, spec.v.qmin, spec.v.qmax, out=scratch('att.vq', v.shape))
    attn = torch.matmul(qq, kq.transpose(-2, -1),
                        out=scratch('att.logits', (b_, h, n, m)))
    if bias is not None:
        attn.add_(bias)
    if spec.mask is not None:
        nw = spec.num_windows
        attn.view(b_ // nw, nw, h, n, m).add_(
            spec.mask.unsqueeze(1).unsqueeze(0))
    p = torch.ops.aten._softmax.out(attn, -1, False,
                                    out=scratch('att.p', attn.shape))
    dst = scratch('att.pq', p.shape) if keep else p
    if spec.p is None:
        pq = p
    elif spec.p.kind == 'log2':
        pq = _log2_fake_quant(p, scale_p, spec.p.bits, scratch=attn, out=dst)
    else:
        pq = _fake_quant(p, scale_p, spec.p.grid.qmin, spec.p.grid.qmax,
                         out=dst)
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
    def grid_of(qz, x):
        if qz is None:
            return None, None
        scale, qmin, qmax = qz[:3]
        gf = qz[3] if len(qz) > 3 else lsq_grad_factor(x.numel(),
                                                       scale.numel(), qmax)
        return scale, GridSpec(qmin, qmax, gf)

    scale_q, grid_q = grid_of(q_quant, q)
    scale_k, grid_k = grid_of(k_quant, k)
    scale_v, grid_v = grid_of(v_quant, v)
    scale_p = prob = None
    if p_quant is not None:
        if p_quant[0] == 'log2':
            scale_p, prob = p_quant[1], ProbSpec('log2', bits=p_quant[2])
        elif p_quant[0] == 'uniform':
            scale_p = p_quant[1]
            qmin, qmax = p_quant[2], p_quant[3]
            b_, h, n = q.shape[0], q.shape[1], q.shape[2]
            gf = p_quant[4] if len(p_quant) > 4 else lsq_grad_factor(
                b_ * h * n * k.shape[2], scale_p.numel(), qmax)
            prob = ProbSpec('uniform', grid=GridSpec(qmin, qmax, gf))
        else:
            raise ValueError(f'p_quant kind {p_quant[0]!r}: use "log2" or '
                             '"uniform".')
    dtypes = {t.dtype for t in (q, k, v, bias, mask, scale_q, scale_k,
                                scale_v, scale_p) if t is not None}
    if len(dtypes) > 1:
        raise ValueError('quant_attention: q, k, v, bias, mask and the scales '
                         f'must share one dtype, got {sorted(map(str, dtypes))}'
                         '; cast them (or use the op-by-op forward).')
    spec = AttnSpec(mult, grid_q, grid_k, grid_v, prob, mask)
    return _QuantAttention.apply(q, k, v, bias, scale_q, scale_k, scale_v,
                                 scale_p, spec)
