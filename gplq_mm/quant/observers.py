"""Streaming calibration observers with memory independent of the batch count.

Both observers keep per-row state, where a row is one scale entry (a channel,
a token position, or the whole tensor).  Under ``torch.distributed`` call
:meth:`sync` once after the last batch: statistics are all-reduced so every
rank ends with the statistics of the union of all ranks' data.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import NonFiniteError


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


def _axis(x: Tensor, axis: int) -> int:
    """``axis`` as a non-negative dimension of ``x`` (ValueError if none)."""
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f'axis {axis} does not exist for a tensor of shape '
                         f'{tuple(x.shape)}: choose an axis in '
                         f'[{-x.ndim}, {x.ndim - 1}].')
    return axis % x.ndim


def rows(x: Tensor, axis: Optional[int]) -> Tensor:
    """View ``x`` as ``[num_rows, M]`` with one row per scale entry."""
    if axis is None:
        return x.reshape(1, -1)
    axis = _axis(x, axis)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


class _Observer:

    def __init__(self, num_rows: int, axis: Optional[int], name: str = ''):
        self.num_rows = num_rows
        self.axis = axis
        self.name = name or 'quantizer'
        self.num_batches = 0

    def _check_rows(self, n: int, x: Tensor) -> None:
        if n != self.num_rows:
            raise ValueError(
                f'{self.name}: calibration input has {n} entries along '
                f'axis {self.axis} (shape {tuple(x.shape)}) but the quantizer '
                f'was built for {self.num_rows}. Per-token quantizers need a '
                'fixed token count (same input size / window size as at build).')

    def _non_finite(self):
        raise NonFiniteError(
            f'{self.name}: calibration input contains NaN or inf. Check the '
            'data pipeline (corrupt images, normalisation with std=0) and '
            'that the FP32 checkpoint loaded correctly.')

    def _row_minmax(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-row min and max of ``x`` in its own layout (no transposed
        copy), checked: NaN and inf reach them, so they stand in for a
        full ``isfinite`` pass."""
        x = x.detach()
        # amin + amax: two fast passes (torch.aminmax over dim 0 was 7x
        # slower than both together on CPU)
        if self.axis is None:
            self._check_rows(1, x)
            lo, hi = x.amin().reshape(1), x.amax().reshape(1)
        else:
            axis = _axis(x, self.axis)
            self._check_rows(x.shape[axis], x)
            dims = [d for d in range(x.ndim) if d != axis]
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        if not (bool(torch.isfinite(lo).all()) and
                bool(torch.isfinite(hi).all())):
            self._non_finite()
        self.num_batches += 1  # a rejected batch is not counted
        return lo.float(), hi.float()

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        """Per-row ``t`` shaped to broadcast against ``x``."""
        if self.axis is None:
            return t.reshape(())
        shape = [1] * x.ndim
        shape[_axis(x, self.axis)] = -1
        return t.reshape(shape)

    def _check_seen(self):
        if self.num_batches == 0:
            raise RuntimeError(
                f'{self.name}: no calibration data was observed. Calibrate with '
                'at least one batch (calib_batches >= 1) that reaches this '
                'layer.')


def _comm_device() -> torch.device:
    """Where the tensors of a collective must be: NCCL reduces CUDA tensors
    only, gloo CPU tensors (the statistics are copied there and back)."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_(t: Tensor, op=None) -> Tensor:
    """All-reduce ``t`` in place over the default process group, on the
    device the backend needs (:func:`_comm_device`; copied there and back),
    e.g. float64 CPU statistics under NCCL.  A no-op without one."""
    if not _dist_on():
        return t
    op = dist.ReduceOp.SUM if op is None else op
    dev = _comm_device()
    if t.device == dev:
        dist.all_reduce(t, op=op)
        return t
    tmp = t.to(dev)
    dist.all_reduce(tmp, op=op)
    return t.copy_(tmp)


class MinMaxObserver(_Observer):
    """Running per-row min and max."""

    def __init__(self, num_rows: int, axis: Optional[int], name: str = ''):
        super().__init__(num_rows, axis, name)
        self.amin: Optional[Tensor] = None
        self.amax: Optional[Tensor] = None

    def update(self, x: Tensor) -> None:
        lo, hi = self._row_minmax(x)
        if self.amin is None:
            self.amin, self.amax = lo, hi
        else:
            self.amin = torch.minimum(self.amin, lo)
            self.amax = torch.maximum(self.amax, hi)

    def sync(self) -> None:
        if not _dist_on():
            return
        dev = _comm_device()
        n = torch.tensor([self.num_batches], dtype=torch.float64, device=dev)
        dist.all_reduce(n)
        if self.amin is None:  # this rank saw nothing: neutral elements
            self.amin = torch.full((self.num_rows, ), float('inf'), device=dev)
            self.amax = torch.full((self.num_rows, ), float('-inf'), device=dev)
        amin, amax = self.amin.to(dev), self.amax.to(dev)
        dist.all_reduce(amin, op=dist.ReduceOp.MIN)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        self.amin, self.amax = amin, amax
        self.num_batches = int(n.item())

    def bounds(self):
        """(low, high) per row."""
        self._check_seen()
        return self.amin, self.amax


class PercentileObserver(_Observer):
    """Per-row histogram over a power-of-two range ``[-R, R)``.

    When data exceed the range, R doubles and pairs of bins merge; because R
    is always a power of two, a value lands in the same final bin whether the
    data arrive in one batch or many.  Memory: ``num_rows * bins`` floats.
    Percentiles are exact to within one bin width (``2R / bins``).
    """

    def __init__(self, num_rows: int, axis: Optional[int], bins: int = 2048,
                 percentile=(1.0, 99.0), name: str = ''):
        super().__init__(num_rows, axis, name)
        self.bins = bins
        self.percentile = percentile
        self.hist = torch.zeros(num_rows, bins, dtype=torch.float64)
        self.exp = torch.full((num_rows, ), -126, dtype=torch.int64)  # R = 2^exp

    @staticmethod
    def _exp_for(absmax: Tensor) -> Tensor:
        # smallest power of two strictly greater than absmax
        e = torch.floor(torch.log2(absmax.double().clamp_min(2.0**-126))) + 1
        return e.to(torch.int64)

    def _grow(self, new_exp: Tensor) -> None:
        """Raise R to ``2^new_exp`` per row, merging bins as if by doubling.

        ``s`` doublings map bin ``i`` to ``floor((i - B/2) / 2^s) + B/2`` (the
        composition of ``s`` pairwise merges); done in one scatter so the first
        batch (from R = 2^-126) costs one pass, not one per doubling.
        """
        steps = (new_exp - self.exp).clamp_min(0)
        sel = steps > 0
        if bool(sel.any()):
            b = self.bins
            # beyond log2(b) + 1 doublings every bin lands in b/2 - 1 or b/2
            s = steps[sel].clamp(max=b.bit_length())
            i = torch.arange(b, dtype=torch.int64, device=self.hist.device) \
                - b // 2
            new_idx = torch.div(i[None, :], (2**s)[:, None],
                                rounding_mode='floor') + b // 2
            h = self.hist[sel]
            self.hist[sel] = torch.zeros_like(h).scatter_add_(1, new_idx, h)
        self.exp = torch.maximum(self.exp, new_exp)

    def update(self, x: Tensor) -> None:
        if self.hist.device != x.device:  # the state follows the data (GPU)
            self.hist, self.exp = self.hist.to(x.device), self.exp.to(x.device)
        x = x.detach()
        lo, hi = self._row_minmax(x)
        self._grow(self._exp_for(torch.maximum(-lo, hi)))
        # bin of v: floor(v / w) with w = 2R / bins a power of two, so
        # v * (1 / w) is exact, computed in x's own layout (no transposed
        # copy).  float32 is exact too while 1 / w stays far from float32's
        # range (R >= 2^-100) and the flat bin indices stay below 2^24;
        # otherwise float64
        inv_w = self.bins / torch.pow(2.0, self.exp.double() + 1)
        flat = self.num_rows * self.bins
        dt = torch.float32 if flat < 2**24 and bool(
            (inv_w <= 2.0**100).all()) else torch.float64
        idx = torch.mul(x.to(dt), self._broadcast(inv_w.to(dt), x))
        idx = idx.floor_().clamp_(-(self.bins // 2), self.bins // 2 - 1)
        # + the first bin of the row in the flat [rows * bins] histogram
        base = torch.arange(self.num_rows, dtype=dt, device=x.device) * \
            self.bins + self.bins // 2
        idx = idx.add_(self._broadcast(base, x))
        idx = idx.int() if flat < 2**31 else idx.long()
        self.hist.view(-1).add_(torch.bincount(
            idx.reshape(-1), minlength=flat).to(self.hist.dtype))

    def sync(self) -> None:
        if not _dist_on():
            return
        dev = _comm_device()
        e = self.exp.to(dev, copy=True)
        dist.all_reduce(e, op=dist.ReduceOp.MAX)
        self._grow(e.to(self.exp.device))
        h = self.hist.to(dev)
        dist.all_reduce(h)
        self.hist = h.to(self.hist.device)
        n = torch.tensor([self.num_batches], dtype=torch.float64, device=dev)
        dist.all_reduce(n)
        self.num_batches = int(n.item())

    def bounds(self):
        """(low-percentile, high-percentile) per row."""
        self._check_seen()
        width = torch.pow(2.0, self.exp.double() + 1) / self.bins
        lo_edge = -torch.pow(2.0, self.exp.double())
        lo, hi = percentile_from_histogram(self.hist, lo_edge, width,
                                           self.percentile)
        return lo.float(), hi.float()


class MSEObserver(PercentileObserver):
    """The clipping range with the least squared quantization error.

    Keeps the same per-row histogram as :class:`PercentileObserver`; at the
    end, for each row, tries ``num_candidates`` symmetric clipping values
    ``c`` in ``[min_ratio, 1] * absmax`` (unsigned grids: ``[0, c]``) and
    keeps the one minimising ``sum_b h_b (v_b - Q_c(v_b))^2`` over the bin
    centres ``v_b`` for the grid ``[qmin, qmax]`` with scale ``c / qmax``.
    """

    def __init__(self, num_rows: int, axis: Optional[int], qmin: int,
                 qmax: int, bins: int = 2048, num_candidates: int = 64,
                 min_ratio: float = 0.05, name: str = ''):
        super().__init__(num_rows, axis, bins, (0.0, 100.0), name)
        self.qmin, self.qmax = qmin, qmax
        self.num_candidates, self.min_ratio = num_candidates, min_ratio

    def bounds(self):
        self._check_seen()
        width = torch.pow(2.0, self.exp.double() + 1) / self.bins
        lo_edge = -torch.pow(2.0, self.exp.double())
        # float32 is plenty to rank the candidates (and 3x faster)
        centres = (lo_edge[:, None] + (torch.arange(
            self.bins, dtype=torch.float64, device=width.device)[None, :] +
            0.5) * width[:, None]).float()  # [C, B]
        hist = self.hist.to(centres.device).float()
        used = hist > 0
        absmax = torch.where(used, centres.abs(), torch.zeros_like(centres))
        absmax = absmax.amax(dim=1)
        if self.qmin >= 0:  # unsigned grid: negatives clip to 0 anyway
            absmax = torch.where(used, centres.clamp_min(0),
                                 torch.zeros_like(centres)).amax(dim=1)
        best_err = torch.full_like(absmax, float('inf'))
        best = absmax.clone()
        for r in torch.linspace(self.min_ratio, 1.0,
                                self.num_candidates).tolist():
            c = (absmax * r).clamp_min(1e-12)
            s = (c / self.qmax)[:, None]
            q = torch.clamp(torch.round(centres / s), self.qmin, self.qmax) * s
            err = (hist * (centres - q)**2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, c, best)
        lo = torch.zeros_like(best) if self.qmin >= 0 else -best
        return lo.float(), best.float()


def quantile_rows(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=1)`` (linear interpolation) for any size
    (``torch.quantile`` refuses more than 2^24 values), by two order
    statistics."""
    n = x.shape[1]
    # the rank as torch.quantile computes it: q rounded to x's dtype, times
    # n - 1 in float64 (then the same lerp: the same bits)
    pos = float(torch.tensor(q, dtype=x.dtype)) * (n - 1)
    lo_i = int(pos)
    hi_i = min(lo_i + 1, n - 1)
    lo = x.kthvalue(lo_i + 1, dim=1).values
    hi = x.kthvalue(hi_i + 1, dim=1).values if hi_i != lo_i else lo
    return torch.lerp(lo, hi, torch.full_like(lo, pos - lo_i))


class RepQObserver(_Observer):
    """RepQ-ViT's calibration (``UniformQuantizer``/``LogSqrt2Quantizer``
    ``init_quantization_scale`` of zkkli/RepQ-ViT), per row.

    Keeps every observed value (RepQ-ViT calibrates on one batch).  At the
    end it tries the quantiles ``p`` = 99.9, 99.99, 99.999 %: the asymmetric
    grid spans ``[quantile(1 - p), quantile(p)]``, the log-sqrt2 grid takes
    ``quantile(p)`` as its top level; it keeps the candidate with the least
    mean squared quantization error (the first on ties, as RepQ-ViT).
    """

    PCTS = (0.999, 0.9999, 0.99999)

    def __init__(self, num_rows: int, axis: Optional[int], bits: int,
                 kind: str, name: str = ''):
        super().__init__(num_rows, axis, name)
        self.bits, self.kind = bits, kind
        self.values = []

    def update(self, x: Tensor) -> None:
        self._row_minmax(x)  # checks the row count and finiteness
        self.values.append(rows(x.detach().float(), self.axis))

    def sync(self) -> None:
        if _dist_on():
            raise RuntimeError(
                f'{self.name}: observer="repq" (the RepQ-ViT baseline) keeps '
                'the calibration tensor and has no multi-process reduction; '
                'run it in one process.')

    def bounds(self):
        from .functional import (affine_qparams, fake_quantize_affine,
                                 fake_quantize_log2)
        self._check_seen()
        x = torch.cat(self.values, dim=1)
        qmax = 2**self.bits - 1
        best_err = best_lo = best_hi = None
        for p in self.PCTS:
            hi = quantile_rows(x, p)
            if self.kind == 'log2':
                lo = torch.zeros_like(hi)
                deq = fake_quantize_log2(x, hi.clamp_min(1e-30)[:, None],
                                         self.bits)
            else:
                lo = quantile_rows(x, 1.0 - p)
                s, z = affine_qparams(lo, hi, qmax)
                deq = fake_quantize_affine(x, s[:, None], z[:, None], qmax)
            err = (x - deq).pow(2).mean(dim=1)
            if best_err is None:
                best_err, best_lo, best_hi = err, lo, hi
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


def build_observer(cfg, num_rows: int, name: str = ''):
    """Observer for a :class:`~gplq_mm.quant.config.QuantConfig`."""
    if cfg.observer == 'minmax':
        return MinMaxObserver(num_rows, cfg.axis, name)
    if cfg.observer == 'mse':
        return MSEObserver(num_rows, cfg.axis, cfg.qmin, cfg.qmax, cfg.bins,
                           name=name)
    if cfg.observer == 'repq':
        return RepQObserver(num_rows, cfg.axis, cfg.bits, cfg.kind, name)
    if cfg.observer != 'percentile':
        raise ValueError(f'observer={cfg.observer!r} is unknown: choose '
                         '"minmax", "percentile", "mse" or "repq".')
    return PercentileObserver(num_rows, cfg.axis, cfg.bins, cfg.percentile,
                              name)
