"""GPTQ rounding of a weight onto a fixed per-output-channel grid (torch only).

Stage 2 quantizes ``W' = W diag(t)`` per output channel (scale ``d``, chosen by
the clipping search).  Rounding each entry to the nearest code ("nearest")
minimises ``||W' - d Wc||`` entry by entry; GPTQ (Frantar et al., 2022: "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers")
instead minimises the layer's *output* error on the calibration inputs,
``||(W' - d Wc) Z^T||^2`` with ``H = Z^T Z``, by quantizing one input column at
a time and spreading its rounding error over the columns not yet quantized
(the optimal brain surgeon update with the Cholesky factor of ``H^-1``).  The
grid (``d``, the bits, the shifts) is unchanged, so the integer layers, the
checkpoint format and the exporters are the same: only which codes are chosen.

Here ``Z`` holds the integer-layer inputs, ``Xc * 2^e`` (the A4 codes shifted
by the pow2 fold), so ``H`` is the Gram matrix of exactly what the integer GEMM
multiplies.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .errors import NonFiniteError


def hessian_update(h: Optional[Tensor], z: Tensor, name: str = '') -> Tensor:
    """``h + Z^T Z`` for the rows of ``z`` (``[..., K]``), a float64 sum.

    ``h`` None starts a new ``[K, K]`` sum on ``z``'s device.  For integer
    ``z`` (the integer layers' inputs) the sum is exact, whatever the order
    in which batches or processes add up: chunks of rows small enough that
    every partial sum is an integer below 2^24 are multiplied in float32
    (exact there, and ~2x faster than a float64 GEMM on a CPU), and the
    chunks are added in float64 (exact below 2^53).  NaN/inf in ``z``:
    :class:`NonFiniteError` naming ``name`` (the layer).
    """
    z2 = z.detach().reshape(-1, z.shape[-1])
    if h is None:
        h = torch.zeros(z2.shape[1], z2.shape[1], dtype=torch.float64,
                        device=z2.device)
    if z2.shape[0] == 0:
        return h
    zmax = float(z2.abs().max())
    if not math.isfinite(zmax):
        raise NonFiniteError(
            f'{name or "GPTQ"}: calibration input contains NaN or inf (GPTQ '
            'rounding). Check the calibration images and that the checkpoint '
            'loaded correctly.')
    rows = int(2**24 // max(zmax * zmax, 1.0))
    integer = bool((z2 == z2.round()).all())
    if not integer or rows < 64:  # float64 throughout
        z64 = z2.to(torch.float64)
        return h.addmm_(z64.t(), z64)
    z32 = z2.to(torch.float32)
    for i in range(0, z32.shape[0], rows):
        c = z32[i:i + rows]
        h += (c.t() @ c).to(torch.float64)
    return h


def gptq_codes(weight: Tensor, hessian: Tensor, scale: Tensor, qmin: int,
               qmax: int, damp: float = 0.01, act_order: bool = True,
               block_size: int = 128) -> Tensor:
    """Integer codes of ``weight`` (``[out, K]``) on the grid ``scale * [qmin,
    qmax]`` (``scale``: ``[out]``), chosen by GPTQ against ``hessian``
    (``[K, K]``, the sum of ``z z^T`` over the layer's inputs ``z``).

    Args:
        damp: Added to the diagonal, as a fraction of its mean (GPTQ's 1 %):
            keeps the Cholesky factorisation stable when inputs are
            correlated or a channel is rare.
        act_order: Quantize the columns of largest ``H_jj`` first (GPTQ's
            "act-order"; helps at 4 bits).  The codes come back in the
            original column order.
        block_size: Columns updated together (lazy batch updates; the result
            does not depend on it beyond float rounding).

    Returns:
        Float tensor of integer codes in ``[qmin, qmax]``, ``weight``'s shape.
        Columns whose input was always zero (``H_jj = 0``) are rounded to the
        nearest code without moving their error elsewhere.
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f'gptq_codes: weight {tuple(weight.shape)} and hessian '
                         f'{tuple(hessian.shape)} do not match ([out, K] and '
                         '[K, K]).')
    if not damp > 0:
        raise ValueError(f'gptq_codes: damp={damp} must be > 0.')
    dev = weight.device
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=dev, dtype=torch.float64).clone()
    d = scale.detach().to(device=dev, dtype=torch.float64).reshape(-1, 1)
    k = w.shape[1]
    diag = torch.diagonal(h)
    dead = diag <= 0
    if bool(dead.all()):
        return torch.clamp(torch.round(w / d), qmin, qmax).to(weight.dtype)
    # a dead input column: H_jj = 1 makes it independent of the others
    h[dead, :] = 0
    h[:, dead] = 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * float(diag[~dead].mean()))
    perm = torch.argsort(diag, descending=True, stable=True) if act_order \
        else torch.arange(k, device=dev)
    w = w[:, perm]
    h = h[perm][:, perm]
    # upper Cholesky factor of H^-1: row i holds the OBS update of column i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(
        torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            q = torch.clamp(torch.round(col / d), qmin, qmax)
            codes[:, i1 + i:i1 + i + 1] = q
            err = (col - q * d) / hinv1[i, i]
            w1[:, i:] -= err * hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(weight.dtype)


def output_error(weight: Tensor, codes: Tensor, scale: Tensor,
                 hessian: Tensor) -> float:
    """``trace((W - d Wc) H (W - d Wc)^T)``: the squared output error of the
    quantized layer summed over the inputs that ``hessian`` sums."""
    e = (weight.detach().double() -
         codes.double() * scale.detach().double().reshape(-1, 1))
    return float(((e @ hessian.double().to(e.device)) * e).sum())
