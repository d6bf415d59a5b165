"""Calibration observers against numpy references."""
import math

import numpy as np
import pytest
import torch

from gplq_mm.quant import (MinMaxObserver, PercentileObserver, QuantConfig,
                           build_observer)
from gplq_mm.quant.errors import NonFiniteError
from gplq_mm.quant.observers import rows


def np_rows(x: np.ndarray, axis):
    """Independent [num_rows, M] layout: one row per scale entry."""
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def pow2_above(m: float) -> float:
    """Smallest power of two strictly greater than m (m > 0)."""
    return 2.0**math.frexp(m)[1]


def np_histogram(r: np.ndarray, bins: int):
    """Per-row histogram over [-R, R), R = pow2_above(max |row|)."""
    out, widths = [], []
    for row in r:
        R = pow2_above(float(np.abs(row).max()))
        w = 2 * R / bins
        idx = np.floor(row / w).astype(np.int64) + bins // 2
        out.append(np.bincount(idx, minlength=bins))
        widths.append(w)
    return np.stack(out), np.array(widths)


def test_pow2_helper_is_strict():
    assert pow2_above(4.0) == 8.0 and pow2_above(3.9) == 4.0
    assert pow2_above(0.3) == 0.5


# --------------------------------------------------------------------------
# rows()
# --------------------------------------------------------------------------
@pytest.mark.parametrize('axis', [None, 0, 1, 2, -1, -2, -3])
def test_rows_layout(axis):
    x = torch.randn(2, 3, 4)
    np.testing.assert_array_equal(rows(x, axis).numpy(),
                                  np_rows(x.numpy(), axis))


@pytest.mark.parametrize('axis', [3, 5, -4])
def test_rows_bad_axis(axis):
    with pytest.raises(ValueError, match=f'axis {axis} does not exist'):
        rows(torch.randn(2, 3, 4), axis)


# --------------------------------------------------------------------------
# min-max
# --------------------------------------------------------------------------
GRANS = [('per_channel', -1, 5), ('per_token', -2, 4), ('per_tensor', None,
                                                         1)]


@pytest.mark.parametrize('gran,axis,n', GRANS, ids=[g[0] for g in GRANS])
def test_minmax_exact_per_row_and_streaming(gran, axis, n):
    cfg = QuantConfig(granularity=gran, observer='minmax')
    assert cfg.axis == axis
    batches = [torch.randn(3, 4, 5) * (i + 1) for i in range(4)]
    obs = build_observer(cfg, n)
    assert isinstance(obs, MinMaxObserver)
    for b in batches:
        obs.update(b)
    lo, hi = obs.bounds()
    r = np_rows(torch.cat(batches).numpy(), axis)
    np.testing.assert_array_equal(lo.numpy(), r.min(1))
    np.testing.assert_array_equal(hi.numpy(), r.max(1))
    assert lo.shape == (n, ) and obs.num_batches == 4


# --------------------------------------------------------------------------
# percentile
# --------------------------------------------------------------------------
def _data_with_outliers(shape):
    x = torch.randn(shape)
    flat = x.view(-1)
    flat[::97] *= 40  # sparse, far outliers: gaps between the order stats
    return x


@pytest.mark.parametrize('gran,axis,n', GRANS, ids=[g[0] for g in GRANS])
@pytest.mark.parametrize('pct', [(1.0, 99.0), (0.0, 100.0), (0.1, 99.9),
                                 (25.0, 50.0)])
def test_percentile_within_one_bin_of_numpy(gran, axis, n, pct):
    bins = 256
    cfg = QuantConfig(granularity=gran, observer='percentile', bins=bins,
                      percentile=pct)
    x = _data_with_outliers((6, 4, 5))
    obs = build_observer(cfg, n)
    assert isinstance(obs, PercentileObserver)
    obs.update(x)
    lo, hi = obs.bounds()
    r = np_rows(x.numpy().astype(np.float64), axis)
    width = np.array([2 * pow2_above(np.abs(row).max()) / bins for row in r])
    ref_lo = np.percentile(r, pct[0], axis=1)
    ref_hi = np.percentile(r, pct[1], axis=1)
    assert (np.abs(lo.numpy() - ref_lo) <= width).all(), (lo, ref_lo, width)
    assert (np.abs(hi.numpy() - ref_hi) <= width).all(), (hi, ref_hi, width)


def test_percentile_across_a_gap():
    # one far outlier below 99 values in [0, 10): the 1st percentile lies
    # between the two lowest values, far from both (numpy interpolates)
    x = torch.cat([torch.tensor([-100.0]), torch.rand(99) * 10])
    obs = PercentileObserver(1, None, bins=2048, percentile=(1.0, 99.0))
    obs.update(x)
    lo, hi = obs.bounds()
    width = 2 * 128 / 2048
    for got, p in ((lo, 1.0), (hi, 99.0)):
        ref = np.percentile(x.numpy().astype(np.float64), p)
        assert abs(got.item() - ref) <= width, (p, got.item(), ref)


def test_percentile_tiny_row():
    obs = PercentileObserver(2, -1, bins=64, percentile=(0.0, 100.0))
    obs.update(torch.tensor([[3.0, -0.5]]))
    lo, hi = obs.bounds()
    # rows: [3.0] (R = 4) and [-0.5] (R = 1)
    assert abs(lo[0].item() - 3.0) <= 8 / 64 and abs(hi[0] - 3.0) <= 8 / 64
    assert abs(lo[1].item() + 0.5) <= 2 / 64 and abs(hi[1] + 0.5) <= 2 / 64


@pytest.mark.parametrize('gran,axis,n', GRANS, ids=[g[0] for g in GRANS])
def test_percentile_streaming_equals_one_shot_exactly(gran, axis, n):
    cfg = QuantConfig(granularity=gran, observer='percentile', bins=128)
    # growing ranges force the histogram to be rebinned several times,
    # including a row-dependent number of doublings
    batches = [torch.randn(2, 4, 5) * 0.01]
    batches += [torch.randn(2, 4, 5) * 10**k for k in (-1, 0, 2, 1, 3)]
    batches[2][0, 0, 0] = 4.0  # exactly a power of two
    one = build_observer(cfg, n)
    one.update(torch.cat(batches))
    stream = build_observer(cfg, n)
    sizes = None
    for b in batches:
        stream.update(b)
        now = [tuple(stream.hist.shape), tuple(stream.exp.shape)]
        assert sizes is None or now == sizes  # memory independent of count
        sizes = now
    assert sizes == [(n, 128), (n, )]
    assert torch.equal(stream.hist, one.hist)
    assert torch.equal(stream.exp, one.exp)
    for a, b in zip(stream.bounds(), one.bounds()):
        assert torch.equal(a, b)
    # and both equal an independent numpy histogram of the concatenation
    ref, _ = np_histogram(
        np_rows(torch.cat(batches).numpy().astype(np.float64), axis), 128)
    np.testing.assert_array_equal(one.hist.numpy(), ref)


def test_minmax_memory_constant():
    obs = MinMaxObserver(5, -1)
    obs.update(torch.randn(3, 5))
    shapes = (obs.amin.shape, obs.amax.shape)
    for _ in range(20):
        obs.update(torch.randn(7, 5))
    assert (obs.amin.shape, obs.amax.shape) == shapes == ((5, ), (5, ))


def test_percentile_first_batch_from_tiny_initial_range_is_cheap():
    # the initial range is 2^-126: growing to ~2^10 must not loop per doubling
    import time
    obs = PercentileObserver(256, -1, bins=2048)
    t = time.perf_counter()
    obs.update(torch.randn(8, 256) * 1000)
    assert time.perf_counter() - t < 1.0
    assert obs.hist.sum().item() == 8 * 256


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize('observer', ['minmax', 'percentile', 'mse'])
def test_observer_errors(observer):
    cfg = QuantConfig(observer=observer, bins=64)
    obs = build_observer(cfg, 5, name='blk.fc1.act_quant')
    with pytest.raises(RuntimeError, match='no calibration data'):
        obs.bounds()
    # NonFiniteError is a ValueError that callers can catch by type
    with pytest.raises(NonFiniteError, match='NaN'):
        obs.update(torch.tensor([[1.0, 2.0, float('nan'), 0.0, 0.0]]))
    with pytest.raises(NonFiniteError, match='NaN or inf'):
        obs.update(torch.tensor([[1.0, 2.0, float('inf'), 0.0, 0.0]]))
    with pytest.raises(ValueError, match='built for 5'):
        obs.update(torch.randn(2, 4))
    assert obs.num_batches == 0  # rejected batches are not counted


def test_build_observer_rejects_unknown_name():
    cfg = QuantConfig()
    cfg.observer = 'kl'  # bypasses __post_init__ validation
    with pytest.raises(ValueError, match="observer='kl' is unknown"):
        build_observer(cfg, 4)
    with pytest.raises(ValueError, match='mse'):
        QuantConfig(observer='mse', kind='log2', signed=False,
                    learnable=False)


def _grid_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              qmin: int, qmax: int) -> torch.Tensor:
    """Per-row squared error of symmetric/unsigned quantization with the
    scale the quantizer derives from (lo, hi)."""
    absmax = hi.clamp_min(0) if qmin >= 0 else torch.maximum(lo.abs(),
                                                             hi.abs())
    s = (absmax / qmax)[:, None]
    return ((torch.clamp(torch.round(x / s), qmin, qmax) * s - x)**2).mean(1)


@pytest.mark.parametrize('dist,signed', [('gauss', True), ('laplace', True),
                                         ('student3', True),
                                         ('halfgauss', False)])
def test_mse_observer_beats_minmax_and_percentiles(dist, signed):
    """On heavy tails the searched clipping has the lowest 4-bit error of
    the three initialisations, measured on the calibration data itself."""
    g = torch.Generator().manual_seed(0)
    n = 8192
    if dist == 'gauss':
        x = torch.randn(24, n, generator=g)
    elif dist == 'laplace':
        u = torch.rand(24, n, generator=g) - 0.5
        x = -u.sign() * torch.log1p(-2 * u.abs())
    elif dist == 'student3':
        z = torch.randn(24, n, generator=g)
        chi = torch.randn(24, n, 3, generator=g).square().sum(-1)
        x = z / (chi / 3).sqrt()
    else:
        x = torch.randn(24, n, generator=g).abs()
    x = x * torch.linspace(0.1, 5, 24)[:, None]  # channel ranges differ
    errs = {}
    for obs in ('minmax', 'percentile', 'mse'):
        cfg = QuantConfig(observer=obs, percentile=(0.1, 99.9), signed=signed,
                          granularity='per_channel', axis=0)
        o = build_observer(cfg, 24)
        for chunk in x.split(2048, dim=1):  # streaming
            o.update(chunk)
        lo, hi = o.bounds()
        errs[obs] = _grid_mse(x, lo, hi, cfg.qmin, cfg.qmax).mean().item()
    assert errs['mse'] <= errs['percentile'] * 1.001, errs
    assert errs['mse'] < errs['minmax'], errs
    if dist in ('laplace', 'student3'):  # heavy tails
        assert errs['mse'] < 0.5 * errs['minmax'], errs


@pytest.mark.parametrize('axis', [-1, 1, None])
def test_percentile_histogram_exact_in_both_precisions(axis):
    """Bins are computed in float32 unless a row's range is below 2^-100
    (then float64): both give numpy's float64 histogram exactly, including
    values on bin edges, an all-zero row and half-precision input."""
    x = torch.randn(6, 4, 8) * 3
    x[..., 0, :] = torch.arange(-8, 8, 2.0).reshape(1, -1)  # powers/edges
    x[:, 2] = 0.0
    tiny = x.clone()
    tiny[:, 1] *= 1e-33  # R ~ 2^-107: float64 path
    for data in (x, tiny, x.half()):
        n = 1 if axis is None else data.shape[axis]
        obs = PercentileObserver(n, axis, bins=256, percentile=(0.0, 100.0))
        obs.update(data)
        ref, _ = np_histogram(np_rows(data.double().numpy(), axis), 256)
        np.testing.assert_array_equal(obs.hist.numpy(), ref)
