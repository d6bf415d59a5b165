"""GPTQ rounding (gplq_mm.quant.gptq) and its use by the integer conversion."""
import pytest
import torch

from gplq_mm.quant import QLinear, QuantConfig, WeightQuantConfig, to_integer
from gplq_mm.quant import functional as QF
from gplq_mm.quant.gptq import gptq_codes, hessian_update, output_error
from gplq_mm.quant.modules import integer_layer_input


def _problem(out=48, k=64, rows=2000, seed=0):
    """Correlated integer inputs with a few wide channels, a weight, its
    per-row MSE-searched 4-bit scale."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)
    z = (torch.randn(rows, k, generator=g) @ mix).round().clamp(-8, 7)
    z[:, :4] *= 8  # shifted codes of outlier channels
    w = 0.05 * torch.randn(out, k, generator=g)
    scale = QF.search_weight_scale(w, -8, 7, 0, 0.5, 51)
    return z, w, scale


def _reference_gptq(w, h, scale, qmin, qmax, damp):
    """GPTQ column by column on H^-1 itself (no Cholesky, no lazy blocks, no
    reordering): after quantizing column i, the remaining columns are updated
    by OBS with the inverse Hessian of the columns not yet quantized."""
    w = w.double().clone()
    h = h.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    d = scale.double().reshape(-1, 1)
    codes = torch.empty_like(w)
    k = w.shape[1]
    for i in range(k):
        hinv = torch.linalg.inv(h[i:, i:])
        q = torch.clamp(torch.round(w[:, i:i + 1] / d), qmin, qmax)
        codes[:, i:i + 1] = q
        err = (w[:, i:i + 1] - q * d) / hinv[0, 0]
        w[:, i:] -= err * hinv[0:1, :]
    return codes


def test_matches_the_column_by_column_definition():
    z, w, scale = _problem(out=8, k=12, rows=300)
    h = hessian_update(None, z)
    ours = gptq_codes(w, h, scale, -8, 7, damp=0.01, act_order=False,
                      block_size=5)
    ref = _reference_gptq(w, h, scale, -8, 7, 0.01)
    assert torch.equal(ours.double(), ref)


def test_lowers_the_output_error_and_keeps_the_grid():
    z, w, scale = _problem()
    h = hessian_update(None, z)
    near = QF.quantize(w, scale.reshape(-1, 1), -8, 7)
    codes = gptq_codes(w, h, scale, -8, 7)
    assert codes.shape == w.shape and codes.dtype == w.dtype
    assert torch.equal(codes, codes.round())
    assert codes.min() >= -8 and codes.max() <= 7
    e_near = output_error(w, near, scale, h)
    e_gptq = output_error(w, codes, scale, h)
    assert e_gptq < 0.7 * e_near
    # the error is what the integer GEMM would make on these inputs
    direct = float((((w - codes * scale[:, None]) @ z.t()) ** 2).sum())
    assert e_gptq == pytest.approx(direct, rel=1e-6)


def test_act_order_and_blocks_return_codes_in_the_original_order():
    z, w, scale = _problem(out=16, k=40, rows=500)
    # distinct diagonal entries: act-order has no ties to break
    h = hessian_update(None, z) + torch.diag(
        torch.arange(40, dtype=torch.float64) * 1e-3)
    a = gptq_codes(w, h, scale, -8, 7, block_size=128)
    b = gptq_codes(w, h, scale, -8, 7, block_size=3)
    assert torch.equal(a, b)  # lazy block updates change nothing here
    # a column permutation of the problem permutes the codes alike
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    c = gptq_codes(w[:, perm], h[perm][:, perm], scale, -8, 7)
    assert torch.equal(c, a[:, perm])


def test_uncorrelated_inputs_give_nearest_rounding():
    # H diagonal: no column's error can be compensated by another one
    _, w, scale = _problem()
    h = torch.diag(torch.rand(w.shape[1], dtype=torch.float64) + 0.5)
    near = QF.quantize(w, scale.reshape(-1, 1), -8, 7)
    assert torch.equal(gptq_codes(w, h, scale, -8, 7), near)


def test_dead_inputs_round_to_nearest():
    z, w, scale = _problem(out=8, k=16, rows=200)
    z[:, 5] = 0
    z[:, 11] = 0
    h = hessian_update(None, z)
    codes = gptq_codes(w, h, scale, -8, 7)
    near = QF.quantize(w, scale.reshape(-1, 1), -8, 7)
    assert torch.equal(codes[:, [5, 11]], near[:, [5, 11]])
    assert not torch.equal(codes, near)
    # no input at all: nearest everywhere
    assert torch.equal(gptq_codes(w, torch.zeros_like(h), scale, -8, 7), near)


def test_bad_arguments_are_named():
    _, w, scale = _problem(out=4, k=8)
    with pytest.raises(ValueError, match=r'do not match \(\[out, K\]'):
        gptq_codes(w, torch.eye(9, dtype=torch.float64), scale, -8, 7)
    with pytest.raises(ValueError, match='damp=0'):
        gptq_codes(w, torch.eye(8, dtype=torch.float64), scale, -8, 7, damp=0)
    with pytest.raises(ValueError, match='rounding=.round.* "nearest" or '
                       '"gptq"'):
        WeightQuantConfig(rounding='round')
    with pytest.raises(ValueError, match='gptq_damp'):
        WeightQuantConfig(rounding='gptq', gptq_damp=0.0)


@pytest.mark.parametrize('fold', ['pow2', 'full'])
def test_integer_layer_with_gptq_codes(fold):
    """to_integer(hessian=...) builds the same integer layer on the same grid
    with GPTQ codes, and its output error on the calibration inputs drops."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    q = QLinear.from_float(lin, QuantConfig(bits=4, granularity='per_channel',
                                            axis=-1), None)
    x = torch.randn(64, 32) @ (torch.eye(32) + 0.4 * torch.randn(32, 32))
    x[:, 0] *= 20  # an outlier channel: its shift is > 0 under pow2
    aq = q.act_quant
    aq.scale.data = x.abs().amax(0) / 7
    aq.initialized.fill_(True)
    aq.set_state('frozen')
    cfg = WeightQuantConfig(fold=fold, rounding='gptq')
    z = integer_layer_input(q, x, cfg)
    # Z is what the integer layer multiplies: integer, shifted under pow2
    assert torch.equal(z, z.round())
    near = to_integer(q, WeightQuantConfig(fold=fold), 'l')
    assert torch.equal(z, near.shifted_codes(x, -1))
    h = hessian_update(None, z)
    gq = to_integer(q, cfg, 'l', hessian=h)
    assert torch.equal(gq.weight_scale, near.weight_scale)
    if fold == 'pow2':
        assert torch.equal(gq.input_shift, near.input_shift)
        assert int(near.input_shift.max()) > 0
    assert not torch.equal(gq.weight_codes(), near.weight_codes())
    with torch.no_grad():
        ref = q(x)
        e_near = float(((near(x) - ref) ** 2).sum())
        e_gptq = float(((gq(x) - ref) ** 2).sum())
    assert e_gptq < 0.8 * e_near
    # rounding='nearest' ignores a Hessian
    again = to_integer(q, WeightQuantConfig(fold=fold), 'l', hessian=h)
    assert torch.equal(again.weight_codes(), near.weight_codes())


def test_stage2_options_refuse_gptq_where_it_does_not_apply():
    from gplq_mm.ptq.export import Stage2Error, Stage2Options
    for method in ('gplq', 'repq'):
        cfg = Stage2Options(method=method,
                            weight_rounding='gptq').weight_config()
        assert cfg.rounding == 'gptq'
    # unset: GPTQ where the weights are quantized by a search, nearest for
    # the trained codes of qat and for RepQ-ViT
    assert Stage2Options().weight_config().rounding == 'gptq'
    assert Stage2Options(method='repq').weight_config().rounding == 'gptq'
    assert Stage2Options(method='qat').weight_config().rounding == 'nearest'
    assert Stage2Options(method='repqvit').resolved_rounding() == 'nearest'
    assert Stage2Options(weight_rounding='nearest').weight_config(
    ).rounding == 'nearest'
    with pytest.raises(Stage2Error, match='--weight-rounding gptq does not '
                       'apply to --method qat: its codes are the trained '
                       'ones.*leave --weight-rounding at nearest'):
        Stage2Options(method='qat', weight_rounding='gptq').weight_config()
    with pytest.raises(Stage2Error, match='--method repqvit: RepQ-ViT rounds'):
        Stage2Options(method='repqvit',
                      weight_rounding='gptq').weight_config()
    with pytest.raises(Stage2Error, match='--weight-rounding round: '
                       'rounding=.round. is unknown'):
        Stage2Options(weight_rounding='round').weight_config()


def test_hessian_sums_are_exact_in_any_order():
    """Integer inputs (codes shifted by up to 4: |z| <= 128) summed in float32
    chunks equal the float64 sum exactly, in any batch order; wide codes
    (8-bit activations shifted) and non-integer inputs take float64."""
    g = torch.Generator().manual_seed(0)
    for lo, hi in ((-128, 113), (-2048, 2048)):
        z = torch.randint(lo, hi, (5000, 24), generator=g).float()
        ref = z.double().t() @ z.double()
        one = hessian_update(None, z)
        parts = None
        for i in (3, 0, 2, 1, 4):  # batches in another order
            parts = hessian_update(parts, z[i * 1000:(i + 1) * 1000])
        assert one.dtype == torch.float64
        assert torch.equal(one, ref) and torch.equal(parts, ref)
    # worst case of the float32 chunks: every product +-127^2 (odd), so a
    # chunk of 1040 rows sums to 16,774,160, just below 2^24; a larger chunk
    # would round the diagonal
    z = (torch.randint(0, 2, (6000, 3), generator=g) * 254 - 127).float()
    assert torch.equal(hessian_update(None, z), z.double().t() @ z.double())
    x = torch.randn(300, 8, generator=g)
    assert torch.allclose(hessian_update(None, x), x.double().t() @ x.double())
    assert torch.equal(hessian_update(None, x[:0]), torch.zeros(8, 8,
                                                               dtype=torch.float64))


def test_non_finite_inputs_and_learned_scales_are_refused():
    from gplq_mm.quant import NonFiniteError
    z = torch.ones(10, 4)
    z[3, 1] = float('nan')
    with pytest.raises(NonFiniteError, match='blocks.0.attn.qkv: calibration '
                       'input contains NaN or inf'):
        hessian_update(None, z, 'blocks.0.attn.qkv')
    lin = QLinear.from_float(torch.nn.Linear(4, 3), QuantConfig(), None)
    lin.act_quant.scale.data.fill_(0.1)
    lin.act_quant.initialized.fill_(True)
    with pytest.raises(ValueError, match='use_learned_scale converts the '
                       'trained codes exactly'):
        to_integer(lin, WeightQuantConfig(rounding='gptq'), 'l',
                   use_learned_scale=True, hessian=torch.eye(
                       4, dtype=torch.float64))
