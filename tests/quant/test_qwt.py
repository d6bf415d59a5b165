"""QwT closed-form compensation against torch.linalg.lstsq / explicit ridge."""
import pytest
import torch

from gplq_mm.quant import NonFiniteError, QwTSums, fit_qwt, solve_ridge


def aug(x):
    x = x.double().reshape(-1, x.shape[-1])
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def linear_residual(m, cin=6, cout=3, noise=0.1, gen=None):
    x = torch.randn(m, cin, generator=gen)
    a = torch.randn(cout, cin, generator=gen)
    b = torch.randn(cout, generator=gen)
    r = x @ a.t() + b + noise * torch.randn(m, cout, generator=gen)
    return x, r


def sums_of(x, r, batches=1):
    s = QwTSums(x.shape[-1], r.shape[-1])
    for xb, rb in zip(x.chunk(batches), r.chunk(batches)):
        s.update(xb, rb)
    return s


def test_lambda0_equals_lstsq():
    x, r = linear_residual(200)
    sol, exact = solve_ridge(sums_of(x, r, batches=4), 0.0)
    ref = torch.linalg.lstsq(aug(x), r.double()).solution
    assert exact
    assert sol.shape == (7, 3) and sol.dtype == torch.float64
    torch.testing.assert_close(sol, ref, rtol=1e-9, atol=1e-9)


def test_lambda0_badly_scaled_channels_is_still_exact():
    x, r = linear_residual(200)
    x[:, 0] *= 1e-5  # a legitimately tiny channel is not "singular"
    x[:, 1] *= 1e4
    sol, exact = solve_ridge(sums_of(x, r), 0.0)
    ref = torch.linalg.lstsq(aug(x), r.double()).solution
    assert exact
    pred, pred_ref = aug(x) @ sol, aug(x) @ ref
    torch.testing.assert_close(pred, pred_ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize('lam', [0.5, 10.0, 1e3])
def test_ridge_equals_explicit_solution_bias_unregularised(lam):
    x, r = linear_residual(50)
    xa, rd = aug(x), r.double()
    reg = torch.eye(7, dtype=torch.float64) * lam
    reg[6, 6] = 0.0  # no penalty on the bias
    ref = torch.linalg.solve(xa.t() @ xa + reg, xa.t() @ rd)
    sol, exact = solve_ridge(sums_of(x, r, batches=3), lam)
    assert exact
    torch.testing.assert_close(sol, ref, rtol=1e-9, atol=1e-9)
    # and it is the minimiser of the penalised objective: gradient is zero
    grad = xa.t() @ (xa @ sol - rd) + reg @ sol
    assert grad.abs().max() < 1e-8 * max(1.0, (xa.t() @ rd).abs().max())


def test_huge_lambda_leaves_bias_free():
    x, r = linear_residual(100)
    sol, _ = solve_ridge(sums_of(x, r), 1e12)
    assert sol[:-1].abs().max() < 1e-6  # weights shrink to zero
    # ...but the unpenalised bias becomes the mean residual
    torch.testing.assert_close(sol[-1], r.double().mean(0), rtol=1e-6,
                               atol=1e-6)


def test_streaming_sums_equal_one_shot():
    x, r = linear_residual(90)
    x3, r3 = x.reshape(3, 30, 6), r.reshape(3, 30, 3)  # [B, N, C] batches
    one = sums_of(x, r)
    stream = QwTSums(6, 3)
    shapes = None
    for i in range(3):
        stream.update(x3[i:i + 1], r3[i:i + 1])
        now = (stream.xx.shape, stream.xr.shape, stream.rr.shape)
        assert shapes is None or now == shapes  # memory independent of count
        shapes = now
    assert stream.n == one.n == 90
    for a, b in ((stream.xx, one.xx), (stream.xr, one.xr),
                 (stream.rr, one.rr)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    xa = aug(x)
    torch.testing.assert_close(one.xx, xa.t() @ xa)
    torch.testing.assert_close(one.xr, xa.t() @ r.double())
    merged = sums_of(x[:40], r[:40]).add(sums_of(x[40:], r[40:]))
    torch.testing.assert_close(merged.xx, one.xx, rtol=1e-12, atol=1e-10)
    assert merged.n == 90


def test_error_from_sums_equals_direct_residual():
    x, r = linear_residual(80)
    s = sums_of(x, r, batches=2)
    sol = torch.randn(7, 3, dtype=torch.float64)
    direct = ((r.double() - aug(x) @ sol)**2).sum().item()
    assert s.error(sol) == pytest.approx(direct, rel=1e-9)
    assert s.error(None) == pytest.approx((r.double()**2).sum().item(),
                                          rel=1e-12)
    best, _ = solve_ridge(s, 0.0)
    direct_best = ((r.double() - aug(x) @ best)**2).sum().item()
    assert s.error(best) == pytest.approx(direct_best, rel=1e-6, abs=1e-8)


def test_fit_reduces_held_out_error():
    gen = torch.Generator().manual_seed(1)
    x, r = linear_residual(400, noise=0.1, gen=gen)
    fit, held = sums_of(x[:100], r[:100]), sums_of(x[100:200], r[100:200])
    res = fit_qwt(fit, held, lam=1e-3)
    assert res.kept and res.exact and res.n == 200
    assert res.weight.shape == (3, 6) and res.bias.shape == (3, )
    assert res.weight.dtype == torch.float32
    assert res.err_after < res.err_before and res.r2 > 0.9
    # fresh rows never seen by the fit
    xt, rt = x[200:], r[200:]
    before = (rt**2).mean()
    after = ((rt - (xt @ res.weight.t() + res.bias))**2).mean()
    assert after < 0.05 * before
    assert after < 2 * 0.1**2  # close to the noise floor
    # returned weights are the refit on both accumulators
    sol, _ = solve_ridge(fit.add(held), 1e-3)
    torch.testing.assert_close(res.weight, sol[:-1].t().float())


def test_pure_noise_fit_is_not_kept():
    # residual independent of X, few rows per parameter: the fit overfits
    x, r = torch.randn(60, 20), torch.randn(60, 4)
    res = fit_qwt(sums_of(x[:30], r[:30]), sums_of(x[30:], r[30:]), lam=0.0)
    assert not res.kept
    assert res.err_after >= res.err_before and res.r2 <= 0
    assert torch.equal(res.weight, torch.zeros(4, 20))
    assert torch.equal(res.bias, torch.zeros(4))


def test_single_accumulator_uses_training_error():
    x, r = linear_residual(50)
    res = fit_qwt(sums_of(x, r), None, lam=0.0)
    assert res.kept and res.n == 50
    res2 = fit_qwt(sums_of(x, r), QwTSums(6, 3), lam=0.0)  # empty held-out
    torch.testing.assert_close(res.weight, res2.weight)


@pytest.mark.parametrize('kind', ['duplicate', 'dead', 'few_rows'])
def test_singular_lambda0_falls_back(kind):
    x, r = linear_residual(60)
    if kind == 'duplicate':
        x = torch.cat([x, x[:, :2]], 1)
    elif kind == 'dead':
        x[:, 3] = 0
    else:
        x, r = x[:4], r[:4]  # fewer rows than unknowns
    s = sums_of(x, r)
    sol, exact = solve_ridge(s, 0.0)
    assert not exact
    assert torch.isfinite(sol).all()
    # the fallback is still a least-squares solution (minimum norm)
    ref = torch.linalg.lstsq(aug(x), r.double(), driver='gelsd').solution
    pred, pred_ref = aug(x) @ sol, aug(x) @ ref
    torch.testing.assert_close(pred, pred_ref, rtol=1e-5, atol=1e-5)
    assert sol.norm() <= ref.norm() * (1 + 1e-5) + 1e-8
    res = fit_qwt(s, None, lam=0.0)
    assert not res.exact
    assert torch.isfinite(res.weight).all() and torch.isfinite(res.bias).all()
    # a positive lambda makes the system regular again
    _, exact_reg = solve_ridge(s, 1.0)
    assert exact_reg


def test_zero_samples_and_bad_input_raise():
    with pytest.raises(ValueError, match='no calibration samples'):
        solve_ridge(QwTSums(4, 2), 0.0)
    with pytest.raises(ValueError, match='no calibration samples'):
        fit_qwt(QwTSums(4, 2), QwTSums(4, 2), 0.1)
    s = QwTSums(4, 2)
    s.update(torch.randn(8, 4), torch.randn(8, 2))
    with pytest.raises(ValueError, match='lambda must be >= 0'):
        solve_ridge(s, -1.0)
    with pytest.raises(NonFiniteError, match='NaN'):
        s.update(torch.tensor([[float('nan'), 0, 0, 0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r'\[\.\.\., 4\]'):
        s.update(torch.randn(2, 8), torch.randn(4, 2))  # 16 = 4 rows of 4
    with pytest.raises(ValueError, match='same rows'):
        s.update(torch.randn(3, 4), torch.randn(2, 2))
    assert s.n == 8
