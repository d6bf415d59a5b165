"""QwT closed-form linear compensation (Fu et al. 2024; GPLQ eq. 3).

For a block with input ``X`` (``[M, C_in]`` rows = tokens) and outputs
``Y_fp`` (FP32 weights) and ``Y_q`` (quantized weights), fit ``W, b`` with

    min ||(Y_fp - Y_q) - (X W^T + b)||^2 + lambda ||W||^2

i.e. ``W = (Y_fp - Y_q) X^T (X X^T + lambda I)^-1`` in the paper's column
notation, with an unregularised bias.  Only the float64 running sums
``X^T X``, ``X^T R`` and ``sum R^2`` are kept, so memory does not grow with the
calibration set, and the error after the fit is computed from the same sums.
Batches alternate between two accumulators: the fit on one is scored on the
other (held out), which decides whether the compensation is kept at all.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .errors import NonFiniteError
from .observers import all_reduce_


# Rows of one float64 pass of QwTSums.update: its scratch (two [rows, C]
# float64 buffers, kept across updates) stays bounded whatever the batch size.
QWT_CHUNK_ELEMS = 1 << 20


class QwTScratch:
    """Float64 scratch of :meth:`QwTSums.update`, kept across batches.

    The fit and held-out accumulators (and, in ``weight_ptq``, all blocks)
    share one: the per-batch float64 copies reuse the same memory instead of
    being allocated and freed batch after batch.
    """

    def __init__(self):
        self.xa: Optional[Tensor] = None  # [rows, C_in + 1], last column 1
        self.r: Optional[Tensor] = None  # [rows, C_out]

    def get(self, rows: int, in_dim: int, out_dim: int) -> Tuple[Tensor, Tensor]:
        xa, r = self.xa, self.r
        if xa is None or xa.shape[0] < rows or xa.shape[1] != in_dim + 1 \
                or r.shape[1] != out_dim:
            self.xa = self.r = xa = r = None  # free the old ones first
            xa = torch.empty(rows, in_dim + 1, dtype=torch.float64)
            xa[:, in_dim] = 1.0
            r = torch.empty(rows, out_dim, dtype=torch.float64)
            self.xa, self.r = xa, r
        return xa[:rows], r[:rows]


class QwTSums:
    """Running sums of one accumulator (augmented with a constant 1 column)."""

    def __init__(self, in_dim: int, out_dim: int,
                 scratch: Optional[QwTScratch] = None):
        self.in_dim, self.out_dim = in_dim, out_dim
        self.xx = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
        self.xr = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)
        self.rr = torch.zeros((), dtype=torch.float64)
        self.n = 0
        self.scratch = scratch if scratch is not None else QwTScratch()

    def update(self, x: Tensor, residual: Tensor) -> None:
        """Add rows: ``x`` ``[..., C_in]`` and ``residual`` ``[..., C_out]``.

        The rows are cast to float64 in chunks of at most
        ``QWT_CHUNK_ELEMS`` elements into the (reused) scratch; nothing is
        added if the rows hold NaN or inf.
        """
        if x.shape[-1] != self.in_dim or residual.shape[-1] != self.out_dim \
                or x.numel() // self.in_dim != residual.numel() // self.out_dim:
            raise ValueError(
                f'QwT: expected inputs [..., {self.in_dim}] and residuals '
                f'[..., {self.out_dim}] with the same rows, got '
                f'{tuple(x.shape)} and {tuple(residual.shape)}.')
        x = x.detach().reshape(-1, self.in_dim)  # a view where possible
        r = residual.detach().reshape(-1, self.out_dim)
        m = x.shape[0]
        step = max(1, QWT_CHUNK_ELEMS // max(self.in_dim + 1, self.out_dim))
        xx = xr = rr = None
        for s in range(0, m, step):
            xa_c, r_c = self.scratch.get(min(step, m - s), self.in_dim,
                                         self.out_dim)
            xa_c[:, :self.in_dim].copy_(x[s:s + step])
            r_c.copy_(r[s:s + step])
            dxx, dxr = xa_c.t() @ xa_c, xa_c.t() @ r_c
            drr = r_c.mul_(r_c).sum()
            if xx is None:
                xx, xr, rr = dxx, dxr, drr
            else:
                xx += dxx
                xr += dxr
                rr += drr
        if m == 0:
            return
        # a NaN/inf row reaches the diagonal of X^T X (x) or the bias row of
        # X^T R (r); finite float32 rows cannot overflow float64 here
        if not (bool(torch.isfinite(xx).all()) and
                bool(torch.isfinite(xr).all()) and bool(torch.isfinite(rr))):
            raise NonFiniteError('QwT: NaN/inf in block inputs or outputs; check the '
                             'calibration images and the checkpoint.')
        self.xx += xx
        self.xr += xr
        self.rr += rr
        self.n += m

    def add(self, other: 'QwTSums') -> 'QwTSums':
        out = QwTSums(self.in_dim, self.out_dim)
        out.xx = self.xx + other.xx
        out.xr = self.xr + other.xr
        out.rr = self.rr + other.rr
        out.n = self.n + other.n
        return out

    def all_reduce(self) -> None:
        # float64 sums on the CPU, reduced where the backend needs them
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        for t in (self.xx, self.xr, self.rr, n):
            all_reduce_(t)
        self.n = int(n.item())

    def error(self, sol: Optional[Tensor]) -> float:
        """``||R - [X 1] sol||^2`` from the sums (``sol=None``: no compensation)."""
        if sol is None:
            return float(self.rr)
        e = self.rr - 2 * (sol * self.xr).sum() + (sol * (self.xx @ sol)).sum()
        return float(e.clamp_min(0))


def solve_ridge(sums: QwTSums, lam: float) -> Tuple[Tensor, bool]:
    """Solve for ``sol = [W^T; b]`` (``[C_in+1, C_out]``, float64).

    Returns ``(sol, exact)``; ``exact=False`` means ``X^T X + lambda I`` was
    (numerically) singular, e.g. ``lambda=0`` with a dead or duplicated input
    channel, and the minimum-norm least-squares solution was used instead
    (documented fallback).
    """
    if sums.n == 0:
        raise ValueError('QwT: no calibration samples were accumulated; use at '
                         'least one calibration image.')
    if lam < 0:
        raise ValueError(f'QwT: lambda must be >= 0, got {lam}.')
    a = sums.xx.clone()
    idx = torch.arange(sums.in_dim, device=a.device)
    a[idx, idx] += lam  # the bias row/column is not regularised
    diag = a.diagonal()
    if bool((diag > 0).all()):
        # Cholesky of the unit-diagonal (Jacobi-scaled) matrix, so the test
        # below does not depend on the scale of the input channels.
        inv = diag.rsqrt()
        chol, info = torch.linalg.cholesky_ex(a * inv[:, None] * inv[None, :])
        if int(info) == 0:
            piv = chol.diagonal()
            # (min/max pivot)^2 bounds 1/cond from above: near round-off
            # means numerically singular (e.g. duplicated input channels),
            # where a "successful" solve returns huge cancelling weights.
            if float((piv.min() / piv.max())**2) > \
                    a.shape[0] * torch.finfo(a.dtype).eps:
                sol = torch.cholesky_solve(sums.xr * inv[:, None],
                                           chol) * inv[:, None]
                if bool(torch.isfinite(sol).all()):
                    return sol, True
    sol = torch.linalg.lstsq(a, sums.xr, driver='gelsd').solution
    return sol, False


@dataclass
class QwTFit:
    """Result of :func:`fit_qwt` for one block."""
    weight: Tensor  # [C_out, C_in] float32
    bias: Tensor  # [C_out]
    kept: bool
    exact: bool
    err_before: float  # held-out squared error without compensation
    err_after: float  # held-out squared error with the (held-out) fit
    r2: float  # 1 - err_after / err_before on held-out rows
    n: int


def fit_qwt(fit: QwTSums, held: Optional[QwTSums], lam: float) -> QwTFit:
    """Fit compensation; keep it only if it helps on the held-out sums.

    The decision uses a fit on ``fit`` scored on ``held``; the returned weights
    are refit on both.  Without held-out rows (one calibration batch) the
    training error decides.
    """
    sol_a, exact = solve_ridge(fit, lam)
    score_on = held if held is not None and held.n > 0 else fit
    before = score_on.error(None)
    after = score_on.error(sol_a)
    total = fit.add(held) if held is not None and held.n > 0 else fit
    kept = after < before
    if kept:
        sol, exact_all = solve_ridge(total, lam)
        exact = exact and exact_all
    else:
        sol = torch.zeros_like(sol_a)
    r2 = 1.0 - after / before if before > 0 else 0.0
    return QwTFit(weight=sol[:-1].t().float().contiguous(),
                  bias=sol[-1].float().contiguous(), kept=kept, exact=exact,
                  err_before=before, err_after=after, r2=r2, n=total.n)
