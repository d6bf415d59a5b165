"""The RepQ-ViT baseline (gplq_mm/ptq/repqvit.py) against the public code.

``_public_*`` below are the calibration functions of zkkli/RepQ-ViT
(``classification/quant/quantizer.py``, Apache-2.0), reduced to what they
compute: our observer, weight quantizer and reparameterization must give the
same numbers.
"""
import pytest
import torch
from torch import nn

from gplq_mm.ptq.repqvit import quantize_weight, reparameterize
from gplq_mm.quant import QLinear, QState, QuantConfig, WeightQuantConfig
from gplq_mm.quant import functional as QF
from gplq_mm.quant.modules import to_integer
from gplq_mm.quant.observers import RepQObserver, quantile_rows
from gplq_mm.quant.quantizer import ActQuantizer

ASYM = dict(granularity='per_tensor', signed=False, zero_point=True,
            observer='repq', learnable=False)


def _public_quantize(x, max, min, n_bits):
    delta = (max - min) / (2**n_bits - 1)
    zero_point = (-min / delta).round()
    x_int = torch.round(x / delta)
    x_quant = torch.clamp(x_int + zero_point, 0, 2**n_bits - 1)
    return (x_quant - zero_point) * delta


def _public_init(x, n_bits):
    """UniformQuantizer.init_quantization_scale(channel_wise=False)."""
    delta = zero_point = None
    best_score = 1e+10
    for pct in [0.999, 0.9999, 0.99999]:
        new_max = torch.quantile(x.reshape(-1), pct)
        new_min = torch.quantile(x.reshape(-1), 1.0 - pct)
        x_q = _public_quantize(x, new_max, new_min, n_bits)
        score = (x - x_q).abs().pow(2).mean()
        if score < best_score:
            best_score = score
            delta = (new_max - new_min) / (2**n_bits - 1)
            zero_point = (-new_min / delta).round()
    return delta, zero_point


def test_quantile_rows_is_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 100, 5001, 12480):
        x = torch.randn(3, n, generator=g)
        for q in (0.999, 0.9999, 0.99999, 0.001, 1 - 0.9999, 1 - 0.99999,
                  0.5):
            assert torch.equal(quantile_rows(x, q),
                               torch.quantile(x, q, dim=1)), (n, q)


@pytest.mark.parametrize('bits', [4, 8])
def test_activation_range_is_the_public_search(bits):
    """Per tensor and per channel (a [B, N, C] input: one search per C)."""
    g = torch.Generator().manual_seed(1)
    # heavy-tailed channels, as after a LayerNorm of a real ViT
    x = torch.randn(4, 50, 6, generator=g) * torch.tensor(
        [0.1, 1, 3, 0.5, 10, 2]) + torch.tensor([0, 1, -2, 0, 5, 0])
    x[0, 0, 4] = 80.0
    q = ActQuantizer(QuantConfig(bits=bits, **ASYM), 1, 't')
    q.set_state(QState.CALIBRATING)
    q(x)
    q.finish_calibration()
    d, z = _public_init(x, bits)
    assert torch.equal(q.scale.data, d.reshape(1))
    assert torch.equal(q.zero_point, z.reshape(1))

    qc = ActQuantizer(QuantConfig(bits=bits, **dict(
        ASYM, granularity='per_channel')), 6, 't')
    qc.set_state(QState.CALIBRATING)
    qc(x)
    qc.finish_calibration()
    for c in range(6):
        d, z = _public_init(x[:, :, c], bits)
        assert float(qc.scale[c]) == float(d) and \
            float(qc.zero_point[c]) == float(z), c


def test_weight_quantizer_is_the_public_one():
    """Asymmetric per output channel, each channel searched on its own
    (Linear rows, Conv2d kernels)."""
    g = torch.Generator().manual_seed(2)
    for w in (torch.randn(5, 300, generator=g),
              torch.randn(4, 3, 5, 5, generator=g)):
        w[0].mul_(20)
        got = quantize_weight(w, 4)
        for c in range(w.shape[0]):
            d, z = _public_init(w[c], 4)
            want = (torch.clamp(torch.round(w[c] / d) + z, 0, 15) - z) * d
            assert torch.equal(got[c], want), c
        assert got.shape == w.shape
        # 16 levels per channel, not more
        assert all(len(torch.unique(got[c])) <= 16 for c in range(w.shape[0]))


def test_sequential_calibration_sees_quantized_upstream():
    """QState.SEQUENTIAL: the second quantizer is calibrated on the first
    one's output (quantized), and the call that calibrates already
    quantizes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 8, generator=g) * 3
    q1 = ActQuantizer(QuantConfig(bits=2, **ASYM), 1, 'q1')
    q2 = ActQuantizer(QuantConfig(bits=4, **ASYM), 1, 'q2')
    for q in (q1, q2):
        q.set_state(QState.SEQUENTIAL)
    y1 = q1(x)
    assert q1.state == QState.FROZEN and bool(q1.initialized)
    assert len(torch.unique(y1)) <= 4  # already quantized (2 bits)
    q2(y1)
    d, z = _public_init(y1, 4)
    assert torch.equal(q2.scale.data, d.reshape(1))
    d_fp, _ = _public_init(x, 4)
    assert not torch.equal(q2.scale.data, d_fp.reshape(1))


def _pair(c_in=6, c_out=5, zp=None):
    g = torch.Generator().manual_seed(4)
    norm = nn.LayerNorm(c_in)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c_in, generator=g) * 3 + 0.1)
        norm.bias.copy_(torch.randn(c_in, generator=g))
    lin = QLinear.from_float(nn.Linear(c_in, c_out), QuantConfig(
        bits=4, **dict(ASYM, granularity='per_channel')), None, 'lin')
    x = torch.randn(64, 10, c_in, generator=g) * 2
    lin.act_quant.set_state(QState.CALIBRATING)
    lin(norm(x))
    lin.act_quant.finish_calibration()
    if zp is not None:
        lin.act_quant.zero_point.fill_(zp)
    return norm, lin, x


def test_reparameterization_keeps_the_float_function():
    norm, lin, x = _pair()
    d = lin.act_quant.scale.detach().clone()
    z = lin.act_quant.zero_point.clone()
    lin.act_quant.set_state(QState.OFF)
    before = lin(norm(x))
    reparameterize(norm, lin, 'lin')
    aq = lin.act_quant
    assert aq.cfg.granularity == 'per_tensor' and aq.scale.numel() == 1
    assert torch.allclose(aq.scale.data, d.mean().reshape(1))
    assert torch.allclose(aq.zero_point, z.mean().reshape(1))
    aq.set_state(QState.OFF)
    torch.testing.assert_close(lin(norm(x)), before, rtol=1e-5, atol=1e-5)


def test_reparameterized_tensor_grid_is_the_channel_grid():
    """With equal integer zero points, quantizing the reparameterized input
    per tensor is quantizing the original one per channel (the point of
    RepQ-ViT's reparameterization)."""
    norm, lin, x = _pair(zp=7.0)
    per_channel = lin(norm(x))
    reparameterize(norm, lin, 'lin')
    per_tensor = lin(norm(x))
    torch.testing.assert_close(per_tensor, per_channel, rtol=1e-4, atol=1e-4)


def test_reparameterize_refuses_an_uncalibrated_pair():
    norm = nn.LayerNorm(6)
    lin = QLinear.from_float(nn.Linear(6, 5), QuantConfig(
        bits=4, **dict(ASYM, granularity='per_channel')), None, 'lin')
    with pytest.raises(ValueError, match='calibrated per-channel'):
        reparameterize(norm, lin, 'lin')


def test_zero_point_configs_are_checked():
    with pytest.raises(ValueError, match='signed=False'):
        QuantConfig(zero_point=True, learnable=False)
    with pytest.raises(ValueError, match='learnable=False'):
        QuantConfig(zero_point=True, signed=False)
    with pytest.raises(ValueError, match='zero_point=True'):
        QuantConfig(observer='repq', learnable=False)
    with pytest.raises(ValueError, match='not per token'):
        QuantConfig(**dict(ASYM, granularity='per_token'))
    assert 'asym' in QuantConfig(**ASYM).describe()


def test_zero_point_has_no_integer_layer():
    norm, lin, x = _pair()
    with pytest.raises(ValueError, match='zero_point=True.*fake quant'):
        to_integer(lin, WeightQuantConfig(), 'lin')


def test_affine_fake_quant_passes_gradient_straight_through():
    x = torch.tensor([-3.0, -0.2, 0.4, 9.0], requires_grad=True)
    y = QF.fake_quantize_affine(x, torch.tensor(0.5), torch.tensor(4.0), 15)
    assert torch.equal(y.detach(), torch.tensor([-2.0, 0.0, 0.5, 5.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_observer_without_data_says_so():
    obs = RepQObserver(1, None, 4, 'uniform', 'q')
    with pytest.raises(RuntimeError, match='no calibration data'):
        obs.bounds()


def test_calib_images_default_follows_the_method():
    """Unset --calib-images: the paper's 512, RepQ-ViT's own 32 (classifier)
    or 1 (detector, one batch at 1333x800); a given number always wins."""
    from mmengine.config import Config
    from gplq_mm.ptq.export import Stage2Options
    det, cls = Config(dict(default_scope='mmdet')), Config(
        dict(default_scope='mmpretrain'))
    assert Stage2Options(method='repqvit').resolved_calib_images(det) == 1
    assert Stage2Options(method='repqvit').resolved_calib_images(cls) == 32
    assert Stage2Options(method='gplq').resolved_calib_images(det) == 512
    assert Stage2Options(method='repq').resolved_calib_images(cls) == 512
    assert Stage2Options(method='repqvit',
                         calib_images=8).resolved_calib_images(det) == 8
