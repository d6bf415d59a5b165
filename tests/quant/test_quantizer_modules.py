"""Configs, ActQuantizer states, QLinear/QConv2d and the integer modules."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gplq_mm.quant import functional as QF
from gplq_mm.quant import (ActQuantizer, IntQConv2d, IntQLinear, QConv2d,
                           QLinear, QState, QuantConfig, WeightQuantConfig,
                           WeightQuantizer, set_act_state, to_integer,
                           unpack_int4)


def np_fake_quant(x, s, qmin, qmax):
    return np.clip(np.round(x / s), qmin, qmax) * s


def calibrated(cfg, n, *batches):
    q = ActQuantizer(cfg, n, name='test.act_quant')
    q.set_state('calibrating')
    for b in batches:
        assert q(b) is b
    q.finish_calibration()
    return q


# --------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [1, 9, 0, -4, 4.0, True, '4', None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match='bits=.* is not supported'):
        QuantConfig(bits=bits)
    with pytest.raises(ValueError, match='bits=.* is not supported'):
        WeightQuantConfig(bits=bits)


@pytest.mark.parametrize('kwargs,match', [
    (dict(granularity='per_row'), "granularity='per_row' is unknown"),
    (dict(observer='kl'), "observer='kl' is unknown"),
    (dict(kind='log10'), "kind='log10' is unknown"),
    (dict(percentile=(-1, 99)), 'percentile'),
    (dict(percentile=(1, 100.5)), 'percentile'),
    (dict(percentile=(50, 50)), 'percentile'),
    (dict(percentile=(99, 1)), 'percentile'),
    (dict(percentile=(1, 50, 99)), 'percentile'),
    (dict(bins=1000), 'power of two'),
    (dict(bins=4), 'power of two'),
    (dict(bins=0), 'power of two'),
    (dict(bins=2048.0), 'power of two'),
    (dict(kind='log2', signed=True, learnable=False), 'signed=False'),
    (dict(kind='log2', signed=False, learnable=True), 'learnable=False'),
])
def test_bad_quant_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize('kwargs,match', [
    (dict(search='kl'), "search='kl' is unknown"),
    (dict(min_ratio=0.0), 'min_ratio'),
    (dict(min_ratio=1.5), 'min_ratio'),
    (dict(num_candidates=0), 'num_candidates'),
])
def test_bad_weight_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightQuantConfig(**kwargs)


def test_config_default_axes():
    assert QuantConfig(granularity='per_channel').axis == -1
    assert QuantConfig(granularity='per_token').axis == -2
    assert QuantConfig(granularity='per_tensor', axis=3).axis is None
    assert QuantConfig(granularity='per_channel', axis=1).axis == 1


# --------------------------------------------------------------------------
# ActQuantizer states
# --------------------------------------------------------------------------
def test_uncalibrated_forward_raises():
    q = ActQuantizer(QuantConfig(), 4, name='backbone.fc1.act_quant')
    assert q.state == QState.LEARNING and not bool(q.initialized)
    with pytest.raises(RuntimeError, match='backbone.fc1.act_quant has no '
                       'calibrated scale'):
        q(torch.randn(2, 4))


def test_off_is_identity():
    q = ActQuantizer(QuantConfig(), 4)
    q.set_state('off')
    x = torch.randn(3, 4) * 100
    assert q(x) is x  # even uncalibrated


@pytest.mark.parametrize('signed', [True, False])
def test_calibration_minmax_scale(signed):
    cfg = QuantConfig(bits=4, signed=signed)
    batches = [torch.randn(2, 3, 4) * (i + 1) + 0.5 for i in range(3)]
    q = ActQuantizer(cfg, 4)
    q.set_state('calibrating')
    assert q.state == QState.CALIBRATING
    for b in batches:
        y = q(b)
        assert y is b  # identity while calibrating
    assert q.observer.num_batches == 3
    q.finish_calibration()
    r = torch.cat(batches).reshape(-1, 4).numpy()
    if signed:
        absmax = np.abs(r).max(0)
        qmax = 7
    else:
        absmax = np.maximum(r.max(0), 0)
        qmax = 15
    np.testing.assert_allclose(q.scale.detach().numpy(), absmax / qmax,
                               rtol=1e-6)
    assert bool(q.initialized) and q.observer is None
    assert q.state == QState.LEARNING
    # every calibration value is inside the grid: no clipping (bar rounding)
    v = torch.cat(batches) / q.scale.detach()
    assert v.max() <= qmax * (1 + 1e-6)
    if signed:
        assert v.min() >= -qmax * (1 + 1e-6)


def test_learning_and_frozen():
    x0 = torch.randn(5, 4) * 2
    q = calibrated(QuantConfig(bits=4), 4, x0)
    s = q.scale.detach().numpy()
    x = (torch.randn(6, 4) * 3).requires_grad_()
    y = q(x)
    np.testing.assert_allclose(y.detach().numpy(),
                               np_fake_quant(x.detach().numpy(), s, -8, 7),
                               rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0

    q.scale.grad = None
    x.grad = None
    q.set_state('frozen')
    y2 = q(x)
    assert torch.equal(y2, y)
    y2.sum().backward()
    assert q.scale.grad is None  # frozen: no scale gradient
    v = x.detach().numpy() / s
    np.testing.assert_array_equal(x.grad.numpy(),
                                  ((v >= -8) & (v <= 7)).astype(np.float32))


def test_non_learnable_never_learns():
    q = calibrated(QuantConfig(learnable=False), 4, torch.randn(3, 4))
    assert q.state == QState.FROZEN and not q.scale.requires_grad
    q.set_state('learning')
    assert q.state == QState.FROZEN


def test_zero_range_channel_gets_median_scale():
    x = torch.randn(6, 4) * torch.tensor([1.0, 2.0, 3.0, 0.0])
    q = calibrated(QuantConfig(), 4, x)
    s = q.scale.detach()
    assert torch.isfinite(s).all() and (s > 0).all()
    others = x[:, :3].abs().amax(0) / 7
    assert s[3].item() == pytest.approx(float(np.median(others.numpy())),
                                        rel=1e-6)
    y = q(torch.randn(2, 4))
    assert torch.isfinite(y).all()


def test_all_zero_tensor_gets_finite_scale():
    q = calibrated(QuantConfig(granularity='per_tensor'), 1, torch.zeros(3, 4))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_calibration_errors():
    q = ActQuantizer(QuantConfig(), 4, name='blk.fc2.act_quant')
    with pytest.raises(RuntimeError, match='calibrat'):
        q.finish_calibration()  # never calibrating
    q.set_state('calibrating')
    with pytest.raises(RuntimeError, match='no calibration data'):
        q.finish_calibration()  # zero batches
    with pytest.raises(ValueError, match='NaN'):
        q(torch.tensor([[0.0, float('nan'), 1.0, 2.0]]))
    assert not bool(q.initialized)


def test_wrong_channel_count_in_forward():
    q = calibrated(QuantConfig(), 4, torch.randn(3, 4))
    with pytest.raises(ValueError, match='4 scales'):
        q(torch.randn(3, 5))


@pytest.mark.parametrize('cfg', [
    QuantConfig(),
    QuantConfig(granularity='per_tensor'),
    QuantConfig(observer='percentile', bins=64),
    QuantConfig(granularity='per_token', signed=False),
])
def test_act_quantizer_state_dict_round_trip(cfg):
    n = 1 if cfg.granularity == 'per_tensor' else \
        (3 if cfg.granularity == 'per_token' else 4)
    x = torch.randn(2, 3, 4)
    q = calibrated(cfg, n, x)
    sd = q.state_dict()
    assert set(sd) == {'scale', 'initialized'}
    fresh = ActQuantizer(cfg, n)
    fresh.load_state_dict(sd)
    assert bool(fresh.initialized)
    xt = torch.randn(2, 3, 4) * 2
    assert torch.equal(fresh(xt), q(xt))
    assert q.scale.shape == (n, )


def test_per_token_quantizer():
    cfg = QuantConfig(granularity='per_token')
    x = torch.randn(2, 3, 8) * torch.tensor([1.0, 5.0, 0.1])[:, None]
    q = calibrated(cfg, 3, x)
    absmax = x.abs().amax(dim=(0, 2))
    torch.testing.assert_close(q.scale.detach(), absmax / 7)
    xt = x.clone().requires_grad_()
    y = q(xt)
    ref = np_fake_quant(x.numpy(), q.scale.detach().numpy()[:, None], -8, 7)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert q.scale.grad.shape == (3, )


def test_log2_quantizer_calibration():
    cfg = QuantConfig(kind='log2', signed=False, learnable=False,
                      granularity='per_tensor')
    x = torch.softmax(torch.randn(4, 8), -1)
    q = calibrated(cfg, 1, x)
    assert q.scale.item() == pytest.approx(x.max().item())
    y = q(x)
    assert (y <= x.max() + 1e-6).all() and (y >= 0).all()


def test_set_act_state_counts():
    m = nn.Sequential(QLinear(4, 4, act_cfg=QuantConfig()),
                      QLinear(4, 2, act_cfg=QuantConfig()))
    assert set_act_state(m, 'off') == 2
    assert all(mod.act_quant.state == QState.OFF for mod in m)


# --------------------------------------------------------------------------
# WeightQuantizer
# --------------------------------------------------------------------------
def test_weight_quantizer_fake_quant():
    w = torch.randn(6, 5)
    wq = WeightQuantizer(WeightQuantConfig(bits=4, search='minmax'), 6)
    out = wq(w)
    s = (w.abs().amax(1) / 7).numpy()[:, None]
    np.testing.assert_allclose(out.detach().numpy(),
                               np_fake_quant(w.numpy(), s, -8, 7), rtol=1e-6,
                               atol=1e-7)
    assert bool(wq.initialized)


# --------------------------------------------------------------------------
# QLinear / QConv2d
# --------------------------------------------------------------------------
def make_qlinear(cfg=None, bias=True):
    lin = nn.Linear(6, 3, bias=bias)
    q = QLinear.from_float(lin, cfg or QuantConfig(), name='head.fc')
    return lin, q


def calibrate_module(m, *batches):
    m.act_quant.set_state('calibrating')
    for b in batches:
        m(b)
    m.act_quant.finish_calibration()
    return m


@pytest.mark.parametrize('bias', [True, False])
def test_qlinear_shares_parameters_and_round_trips(bias):
    lin, q = make_qlinear(bias=bias)
    lin.eval()
    q2 = QLinear.from_float(lin, QuantConfig())
    assert not q2.training
    assert id(q.weight) == id(lin.weight)
    assert id(q.bias) == id(lin.bias)
    assert q.weight.device.type == 'cpu'
    back = q.to_float()
    assert type(back) is nn.Linear
    assert id(back.weight) == id(lin.weight) and id(back.bias) == id(lin.bias)
    x = torch.randn(4, 6)
    assert torch.equal(back(x), lin(x))
    assert back.training == q.training
    keys = {'weight', 'act_quant.scale', 'act_quant.initialized'}
    if bias:
        keys.add('bias')
    assert set(q.state_dict()) == keys


def test_qlinear_state_dict_keys_and_round_trip():
    lin, q = make_qlinear()
    calibrate_module(q, torch.randn(8, 6))
    sd = q.state_dict()
    assert list(sd) == ['weight', 'bias', 'act_quant.scale',
                        'act_quant.initialized']
    fresh = QLinear(6, 3, act_cfg=QuantConfig())
    fresh.load_state_dict(sd)
    x = torch.randn(5, 6) * 2
    assert torch.equal(fresh(x), q(x))
    # an FP32 checkpoint (weight, bias) loads into the quantized module
    fresh2 = QLinear(6, 3, act_cfg=QuantConfig())
    missing, unexpected = fresh2.load_state_dict(lin.state_dict(), strict=False)
    assert set(missing) == {'act_quant.scale', 'act_quant.initialized'}
    assert not unexpected


def test_qlinear_forward_and_grads_match_explicit_fake_quant():
    lin, q = make_qlinear()
    calibrate_module(q, torch.randn(8, 6))
    x = (torch.randn(2, 5, 6) * 2).requires_grad_()
    y = q(x)
    s = q.act_quant.scale.detach()
    ref = F.linear(torch.clamp(torch.round(x.detach() / s), -8, 7) * s,
                   lin.weight.detach(), lin.bias.detach())
    torch.testing.assert_close(y.detach(), ref)
    y.sum().backward()
    assert q.act_quant.scale.grad is not None
    assert lin.weight.grad is not None  # shared parameter gets the gradient
    # OFF: plain float linear
    q.act_quant.set_state('off')
    assert torch.equal(q(x), lin(x))


def test_qlinear_rejects_per_token():
    with pytest.raises(ValueError, match='per_token'):
        QLinear(4, 4, act_cfg=QuantConfig(granularity='per_token'))
    with pytest.raises(ValueError, match='per_token'):
        QLinear.from_float(nn.Linear(4, 4),
                           QuantConfig(granularity='per_token'))


def test_qconv2d_shares_parameters_and_round_trips():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    q = QConv2d.from_float(conv, QuantConfig(), name='patch_embed')
    assert id(q.weight) == id(conv.weight) and id(q.bias) == id(conv.bias)
    assert q.act_quant.cfg.axis == 1 and q.act_quant.num_channels == 3
    assert q.act_quant.scale.device == conv.weight.device
    assert list(q.state_dict()) == ['weight', 'bias', 'act_quant.scale',
                                    'act_quant.initialized']
    back = q.to_float()
    assert type(back) is nn.Conv2d and id(back.weight) == id(conv.weight)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(back(x), conv(x))

    calibrate_module(q, x)
    absmax = x.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(q.act_quant.scale.detach(), absmax / 7)
    s = q.act_quant.scale.detach().reshape(1, 3, 1, 1)
    ref = conv(torch.clamp(torch.round(x / s), -8, 7) * s)
    torch.testing.assert_close(q(x), ref)
    fresh = QConv2d(3, 4, 3, padding=1, stride=2, act_cfg=QuantConfig())
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match='per_token'):
        QConv2d(3, 4, 3, act_cfg=QuantConfig(granularity='per_token'))


# --------------------------------------------------------------------------
# integer execution
# --------------------------------------------------------------------------
@pytest.mark.parametrize('fold', ['pow2', 'full'])
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
@pytest.mark.parametrize('bias', [True, False])
def test_int_qlinear_equals_integer_matmul_and_fake_quant(gran, bias, fold):
    lin = nn.Linear(16, 5, bias=bias)
    q = QLinear.from_float(lin, QuantConfig(granularity=gran))
    calibrate_module(q, torch.randn(32, 16) * torch.linspace(0.1, 3, 16))
    iq = to_integer(q, WeightQuantConfig(bits=4, fold=fold))
    assert isinstance(iq, IntQLinear)
    assert iq.weight_packed.dtype == torch.uint8
    assert iq.weight_packed.shape == (5, 8)
    assert iq.act_quant.state == QState.FROZEN

    x = torch.randn(3, 7, 16) * 2
    y = iq(x)
    # (a) integer GEMM computed here, independently, in int64
    s_act = q.act_quant.scale.detach()
    codes_x = torch.clamp(torch.round(x / s_act), -8, 7).to(torch.int64)
    if fold == 'pow2':
        shift = iq.input_shift.to(torch.int64)
        # the shifts of the fold, recomputed here (anchor: the largest scale)
        assert torch.equal(shift, pow2_shifts(s_act, 4))
        # a 30x range of channel scales: 4 octaves of shifts (none for a
        # per-tensor scale)
        assert int(shift.max()) == (4 if gran == 'per_channel' else 0)
        codes_x = codes_x << shift  # integer shift: int8 GEMM input
        assert codes_x.min() >= -128 and codes_x.max() <= 127
    else:
        assert iq.input_shift is None
    codes_w = unpack_int4(iq.weight_packed, 16).to(torch.int64)
    assert codes_w.min() >= -8 and codes_w.max() <= 7
    assert codes_w.abs().max() >= 7  # the grid is used
    acc = codes_x @ codes_w.t()
    ref = acc.double() * iq.weight_scale.double()
    if bias:
        ref = ref + lin.bias.detach().double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # (b) the fake-quant float path
    ref_b = F.linear(q.act_quant(x), iq.dequantized_weight(), iq.bias)
    torch.testing.assert_close(y, ref_b, rtol=1e-5, atol=1e-5)
    # the integer layer approximates the W32A4 layer (4-bit weights)
    ref_w32 = q(x)
    rel = (y - ref_w32).norm() / ref_w32.norm()
    assert rel < 0.2


def pow2_shifts(s: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Independent reference of the fold's shifts (int64): anchored at the
    largest scale, clamped to [0, max_shift], lowered to start at 0."""
    if s.numel() == 1:
        return torch.zeros(1, dtype=torch.int64)
    e = [min(max(round(math.log2(v / (float(s.max()) / 2**max_shift))), 0),
             max_shift) for v in s.tolist()]
    return torch.tensor(e, dtype=torch.int64) - min(e)


def test_weight_folding_within_one_step():
    lin = nn.Linear(12, 6)
    q = QLinear.from_float(lin, QuantConfig())
    calibrate_module(q, torch.randn(32, 12) * torch.linspace(0.1, 3, 12))
    s_act = q.act_quant.scale.detach()
    w = lin.weight.detach()
    for search in ('minmax', 'mse'):
        iq = to_integer(q, WeightQuantConfig(bits=4, search=search,
                                             fold='full'))
        d = iq.weight_scale[:, None]
        folded = w * s_act  # W diag(s)
        codes = iq.weight_codes()
        err = (iq.dequantized_weight() * s_act - folded).abs()
        torch.testing.assert_close(iq.dequantized_weight() * s_act, codes * d)
        inside = folded.abs() <= 7 * d * (1 + 1e-6)  # not clipped
        assert (err[inside] <= (0.5 * d.expand_as(err))[inside] + 1e-6).all()
        if search == 'minmax':
            assert inside.all()
            torch.testing.assert_close(iq.weight_scale,
                                       folded.abs().amax(1) / 7)
        # in input units: W_eff within one step of W per output channel
        step = d / s_act
        assert ((iq.dequantized_weight() - w).abs()[inside] <=
                step.expand_as(w)[inside]).all()


def test_int_qlinear_8bit_weights():
    lin = nn.Linear(8, 4)
    q = calibrate_module(QLinear.from_float(lin, QuantConfig(bits=8)),
                         torch.randn(16, 8))
    iq = to_integer(q, WeightQuantConfig(bits=8))
    assert iq.weight_packed.dtype == torch.int8
    codes = iq.weight_codes()
    assert codes.min() >= -128 and codes.max() <= 127
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        iq(x), F.linear(q.act_quant(x), iq.dequantized_weight(), iq.bias))
    torch.testing.assert_close(iq(x), q(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize('fold', ['pow2', 'full'])
def test_int_qlinear_state_dict_round_trip(fold):
    lin = nn.Linear(8, 4)
    q = calibrate_module(QLinear.from_float(lin, QuantConfig()),
                         torch.randn(16, 8) * torch.linspace(0.1, 4, 8))
    iq = to_integer(q, WeightQuantConfig(fold=fold))
    keys = {'weight_packed', 'weight_scale', 'bias', 'act_quant.scale',
            'act_quant.initialized'}
    # fold='full' layers keep the keys of checkpoints written before 'pow2'
    assert set(iq.state_dict()) == (keys | {'input_shift'} if fold == 'pow2'
                                    else keys)
    fresh = IntQLinear(8, 4, True, QuantConfig(), shift=fold == 'pow2')
    fresh.load_state_dict(iq.state_dict())
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), iq(x))
    if fold == 'pow2':  # a layer built without shifts refuses them
        with pytest.raises(RuntimeError, match='input_shift'):
            IntQLinear(8, 4, True, QuantConfig()).load_state_dict(
                iq.state_dict())


def test_split_pow2_is_exact_and_bounded():
    s = torch.tensor([3e-4, 0.01, 0.02, 0.05, 0.3, 1.0, 2.9])
    t, e = QF.split_pow2(s, 4)
    assert torch.equal(t * torch.exp2(e), s)  # exact: only the exponent moves
    assert torch.equal(e, e.round()) and e.min() >= 0 and e.max() == 4
    ref = s.max() / 16
    free = e > 0  # not clamped at 0: t within sqrt(2) of the anchor
    assert ((t[free] / ref).log2().abs() <= 0.5 + 1e-6).all()
    assert torch.equal(t[~free], s[~free])  # far below: nothing shifted
    t0, e0 = QF.split_pow2(s, 0)
    assert torch.equal(t0, s) and not e0.any()
    t1, e1 = QF.split_pow2(torch.tensor([0.7]), 4)
    assert torch.equal(t1, torch.tensor([0.7])) and not e1.any()
    # channels that agree (the RGB input) spend no shift
    s3 = torch.tensor([0.9, 1.0, 1.1])
    t3, e3 = QF.split_pow2(s3, 4)
    assert torch.equal(t3, s3) and not e3.any()


def test_pow2_fold_keeps_weight_precision_under_outlier_channels():
    # Activation outlier channels (12x the others' range; 28x in the DINOv2
    # layer-0 fc1 input) with weights independent of them: folding the whole
    # scale lets the outlier columns set every row's range and rounds the
    # other columns away; the shifts keep the weight error of W itself.
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    chan = torch.ones(64)
    chan[:4] = 12.0
    q = calibrate_module(QLinear.from_float(lin, QuantConfig()),
                         torch.randn(256, 64) * chan)
    w = lin.weight.detach()

    def rel(fold):
        iq = to_integer(q, WeightQuantConfig(fold=fold))
        return float((iq.dequantized_weight() - w).norm() / w.norm())

    plain = QF.search_weight_scale(w, -8, 7)
    direct = float((QF.fake_quantize(w, plain[:, None], -8, 7) - w).norm() /
                   w.norm())
    assert rel('pow2') < 1.5 * direct
    assert rel('full') > 3 * rel('pow2')


def test_to_integer_needs_calibration():
    _, q = make_qlinear()
    with pytest.raises(RuntimeError, match='calibrated'):
        to_integer(q, WeightQuantConfig())


@pytest.mark.parametrize('fold', ['pow2', 'full'])
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
def test_int_qconv2d_equals_integer_conv_and_fake_quant(gran, fold):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    q = QConv2d.from_float(conv, QuantConfig(granularity=gran))
    x0 = torch.randn(4, 3, 9, 9) * torch.tensor([0.5, 1.0, 3.0])[:, None, None]
    calibrate_module(q, x0)
    iq = to_integer(q, WeightQuantConfig(bits=4, fold=fold))
    assert isinstance(iq, IntQConv2d)
    x = torch.randn(2, 3, 9, 9)
    y = iq(x)
    # (a) integer convolution via im2col in int64
    s = q.act_quant.scale.detach()
    s = s.reshape(1, 3, 1, 1) if s.numel() > 1 else s.reshape(())
    codes_x = torch.clamp(torch.round(x / s), -8, 7)
    if fold == 'pow2':
        e = iq.input_shift.to(torch.int64)
        assert torch.equal(e, pow2_shifts(q.act_quant.scale.detach(), 4))
        codes_x = (codes_x.to(torch.int64) << e.reshape(-1, 1, 1)).double()
    cols = F.unfold(codes_x.double(), 3, padding=1, stride=2).to(torch.int64)
    codes_w = unpack_int4(iq.weight_packed, 27).to(torch.int64)  # [4, 27]
    assert codes_w.min() >= -8 and codes_w.max() <= 7
    acc = codes_w @ cols  # [2, 4, L]
    ref = acc.double() * iq.weight_scale.double()[:, None] + \
        conv.bias.detach().double()[:, None]
    torch.testing.assert_close(y.double().reshape(2, 4, -1), ref, rtol=1e-5,
                               atol=1e-5)
    # (b) fake-quant float path
    ref_b = F.conv2d(q.act_quant(x), iq.dequantized_weight(), iq.bias, 2, 1)
    torch.testing.assert_close(y, ref_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cin,cout,groups', [(4, 8, 4), (6, 4, 2)])
def test_int_qconv2d_grouped_pow2(cin, cout, groups):
    """Default fold on a grouped conv: output channel o folds the t of its
    own group's input channels; shifts and weight grid recomputed here."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    q = QConv2d.from_float(conv, QuantConfig())
    scales = torch.logspace(-1, 1.3, cin)[:, None, None]  # 200x range
    calibrate_module(q, torch.randn(4, cin, 6, 6) * scales)
    iq = to_integer(q, WeightQuantConfig(bits=4, search='minmax'))
    s = q.act_quant.scale.detach()
    e = pow2_shifts(s, 4)
    assert torch.equal(iq.input_shift.to(torch.int64), e)
    t = s / 2.0**e
    cin_g = cin // groups
    t_per_out = torch.stack([t[(o // (cout // groups)) * cin_g:][:cin_g]
                             for o in range(cout)])
    folded = conv.weight.detach() * t_per_out[:, :, None, None]
    torch.testing.assert_close(iq.weight_scale,
                               folded.abs().flatten(1).amax(1) / 7)
    x = torch.randn(2, cin, 6, 6) * scales
    codes_x = torch.clamp(torch.round(x / s[:, None, None]), -8, 7)
    shifted = codes_x.to(torch.int64) << e[:, None, None]
    acc = F.conv2d(shifted.double(), iq.weight_codes().double(), None, 1, 1,
                   1, groups)
    ref = acc * iq.weight_scale.double()[:, None, None] + \
        conv.bias.detach().double()[:, None, None]
    torch.testing.assert_close(iq(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('cin,cout,groups', [(4, 8, 4), (4, 4, 4), (6, 4, 2)])
def test_int_qconv2d_grouped(cin, cout, groups):
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    q = QConv2d.from_float(conv, QuantConfig())
    scales = torch.linspace(0.2, 4, cin)[:, None, None]
    calibrate_module(q, torch.randn(4, cin, 6, 6) * scales)
    iq = to_integer(q, WeightQuantConfig(bits=4, search='minmax', fold='full'))
    x = torch.randn(2, cin, 6, 6) * scales
    y = iq(x)
    # folding: output channel o only sees the scales of its own group
    s = q.act_quant.scale.detach()
    cin_g = cin // groups
    s_per_out = torch.stack([s[(o // (cout // groups)) * cin_g:][:cin_g]
                             for o in range(cout)])  # [cout, cin_g]
    folded = conv.weight.detach() * s_per_out[:, :, None, None]
    torch.testing.assert_close(iq.weight_scale,
                               folded.abs().flatten(1).amax(1) / 7)
    codes_x = torch.clamp(torch.round(x / s[:, None, None]), -8, 7)
    acc = F.conv2d(codes_x.double(), iq.weight_codes().double(), None, 1, 1,
                   1, groups)
    ref = acc * iq.weight_scale.double()[:, None, None] + \
        conv.bias.detach().double()[:, None, None]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    ref_b = F.conv2d(q.act_quant(x), iq.dequantized_weight(), iq.bias, 1, 1,
                     1, groups)
    torch.testing.assert_close(y, ref_b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        rel = (y - q(x)).norm() / q(x).norm()
    assert rel < 0.2  # close to the W32A4 layer


@pytest.mark.parametrize('fold', ['pow2', 'full'])
def test_direct_qat_layer_converts_to_the_same_integer_layer(fold):
    """Direct W4A4 QAT trains its weight quantizer on the grid the integer
    layer uses (the same fold): after training steps that move the activation
    and weight scales, to_integer(use_learned_scale=True) computes what the
    fake-quantized layer computed."""
    torch.manual_seed(0)
    chan = torch.linspace(0.05, 2.0, 16)
    q = QLinear.from_float(nn.Linear(16, 8), QuantConfig(),
                           WeightQuantConfig(learnable=True, fold=fold))
    calibrate_module(q, torch.randn(64, 16) * chan)
    q.act_quant.set_state('learning')
    opt = torch.optim.SGD(q.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        q(torch.randn(8, 16) * chan).square().mean().backward()
        opt.step()
    q.act_quant.set_state('frozen')
    iq = to_integer(q, WeightQuantConfig(fold='full' if fold == 'pow2' else
                                         'pow2'), use_learned_scale=True)
    # the learned scale belongs to the trained fold, whatever stage 2 asks
    assert (iq.input_shift is not None) == (fold == 'pow2')
    torch.testing.assert_close(iq.weight_scale, q.weight_quant.scale.detach())
    x = torch.randn(5, 16) * chan
    with torch.no_grad():
        torch.testing.assert_close(iq(x), q(x), rtol=1e-5, atol=1e-5)


def test_weight_quantizer_checkpoint_names_its_fold():
    """A direct-QAT weight scale belongs to the grid it trained on: loading it
    into a layer with another fold (or from a checkpoint written before the
    option: no fold_shift, fully folded) is refused with the fix."""
    q = QLinear.from_float(nn.Linear(8, 4), QuantConfig(),
                           WeightQuantConfig(learnable=True))
    sd = q.state_dict()
    assert int(sd['weight_quant.fold_shift']) == 4
    full = QLinear.from_float(nn.Linear(8, 4), QuantConfig(),
                              WeightQuantConfig(learnable=True, fold='full'))
    with pytest.raises(ValueError, match='fold="pow2", max_shift=4.*'
                       'config asks for fold="full"'):
        full.load_state_dict(sd)
    old = {k: v for k, v in sd.items() if k != 'weight_quant.fold_shift'}
    with pytest.raises(ValueError, match='quant.weight.fold="full"'):
        q.load_state_dict(old, strict=False)
    # ... and loads into a fold="full" layer as it is
    full.load_state_dict(old)
    assert torch.equal(full.weight_quant.scale, q.weight_quant.scale)
    q2 = QLinear.from_float(nn.Linear(8, 4), QuantConfig(),
                            WeightQuantConfig(learnable=True))
    q2.load_state_dict(sd)  # same fold: loads
    assert torch.equal(q2.weight_quant.scale, q.weight_quant.scale)
