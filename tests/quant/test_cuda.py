"""The quantization core on CUDA tensors: the same numbers as on the CPU.

Users run stage 1 and stage 2 on GPUs.  Every test here builds a layer on the
CPU, copies it to ``cuda`` and checks that forward and backward give what the
CPU gives (codes exactly, floats up to reduction order) and that nothing falls
back to the CPU.  Skipped where no GPU is present (CI); run on a GPU machine
with ``python -m pytest tests/quant/test_cuda.py``.
"""
import copy

import pytest
import torch
from torch import nn

from gplq_mm.quant import (ActQuantizer, QConv2d, QLinear, QState,
                           QuantConfig, QwTSums, WeightQuantConfig,
                           build_observer, fit_qwt, quant_attention,
                           to_integer)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA GPU')
CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def _exact_float32():
    # TF32 would change float32 matmuls/convs by ~1e-3: compare real float32
    old = (torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _calibrated(layer, x):
    """Calibrate ``layer.act_quant`` on ``x`` (CPU) and switch to LSQ."""
    layer.act_quant.set_state(QState.CALIBRATING)
    with torch.no_grad():
        layer(x)
    layer.act_quant.finish_calibration()
    return layer


def _fwd_bwd(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    # a fixed positive upstream gradient: its row sums do not cancel, so
    # float32 sums in another order agree to ~1e-6 relative
    up = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * up.to(out.device)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same(cpu, gpu, rtol=1e-4, atol=1e-5):
    assert gpu.device.type == 'cuda'
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=rtol, atol=atol)


def _assert_close_sum(cpu, gpu, tol=1e-5):
    """Gradients summed over many rows (bias, weight, scale): the two devices
    add in another order, so compare relative to the whole tensor's norm."""
    assert gpu.device.type == 'cuda'
    err = (gpu.cpu().double() - cpu.double()).norm() / cpu.double().norm()
    assert err <= tol, f'relative error {err:.2e}'


@pytest.mark.parametrize('rows', [7, 5000])  # 5000 x 96: several row chunks
def test_lsq_linear_cuda_matches_cpu(rows):
    torch.manual_seed(0)
    layer = QLinear(96, 64, act_cfg=QuantConfig())
    x = torch.randn(rows, 96) * torch.linspace(0.1, 4, 96)
    _calibrated(layer, x)
    gl = copy.deepcopy(layer).to(CUDA)
    out_c, gx_c, g_c = _fwd_bwd(layer, x)
    out_g, gx_g, g_g = _fwd_bwd(gl, x.to(CUDA))
    _assert_same(out_c, out_g)
    _assert_same(gx_c, gx_g)
    for n in g_c:
        _assert_close_sum(g_c[n], g_g[n])
    # the integer codes of the input are the same on both devices
    torch.testing.assert_close(gl.act_quant.codes(x.to(CUDA)).cpu(),
                               layer.act_quant.codes(x), rtol=0, atol=0)


def test_lsq_conv2d_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = QConv2d(8, 16, 3, padding=1, act_cfg=QuantConfig())
    x = torch.randn(2, 8, 12, 12)
    _calibrated(conv, x)
    gc = copy.deepcopy(conv).to(CUDA)
    out_c, gx_c, g_c = _fwd_bwd(conv, x)
    out_g, gx_g, g_g = _fwd_bwd(gc, x.to(CUDA))
    _assert_same(out_c, out_g)
    _assert_same(gx_c, gx_g)
    for n in g_c:
        _assert_close_sum(g_c[n], g_g[n])


@pytest.mark.parametrize('with_bias_mask', [False, True])
def test_quant_attention_cuda_matches_cpu(with_bias_mask):
    torch.manual_seed(0)
    B, h, N, d = 4, 2, 16, 8
    q, k, v = (torch.randn(B, h, N, d) for _ in range(3))
    s = torch.full((1, 1, N, 1), 0.3)  # per token
    bias = torch.randn(1, h, N, N) if with_bias_mask else None
    mask = (torch.randn(2, N, N) > 0).float() * -100. if with_bias_mask else None

    def run(dev):
        ins = [t.detach().to(dev).requires_grad_(True) for t in (q, k, v)]
        sc = s.detach().to(dev).requires_grad_(True)
        b = None if bias is None else \
            bias.detach().to(dev).requires_grad_(True)
        out = quant_attention(
            *ins, d ** -0.5, (sc, -8, 7), (sc, -8, 7), (sc, -8, 7),
            ('log2', torch.tensor(1.0, device=dev), 4), bias=b,
            mask=None if mask is None else mask.to(dev))
        out.sum().backward()
        return out.detach(), [t.grad for t in ins] + [sc.grad]

    out_c, g_c = run(torch.device('cpu'))
    out_g, g_g = run(CUDA)
    _assert_same(out_c, out_g)
    for a, b in zip(g_c[:3], g_g[:3]):
        _assert_same(a, b, rtol=1e-3, atol=1e-4)
    _assert_close_sum(g_c[3], g_g[3])  # the scale: a sum over [B, h, d]


def test_integer_layer_cuda_matches_cpu():
    torch.manual_seed(0)
    layer = QLinear(64, 32, act_cfg=QuantConfig())
    x = torch.randn(50, 64) * torch.linspace(0.1, 3, 64)
    _calibrated(layer, x)
    intl = to_integer(layer, WeightQuantConfig(bits=4), 'fc')
    gint = to_integer(copy.deepcopy(layer).to(CUDA), WeightQuantConfig(bits=4),
                      'fc')
    assert all(t.device.type == 'cuda' for t in gint.state_dict().values())
    for a, b in zip(intl.state_dict().values(), gint.state_dict().values()):
        if not a.is_floating_point():  # packed weight codes: identical
            assert torch.equal(a, b.cpu())
    with torch.no_grad():
        _assert_same(intl(x), gint(x.to(CUDA)))


@pytest.mark.parametrize('observer', ['minmax', 'percentile'])
def test_observers_on_cuda(observer):
    torch.manual_seed(0)
    cfg = QuantConfig(observer=observer)
    xs = [torch.randn(64, 24) * 3 for _ in range(3)]
    obs_c, obs_g = (build_observer(cfg, 24) for _ in range(2))
    for x in xs:
        obs_c.update(x)
        obs_g.update(x.to(CUDA))
    for a, b in zip(obs_c.bounds(), obs_g.bounds()):
        assert b.device.type == 'cuda'
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)


def test_act_quantizer_calibrates_and_learns_on_cuda():
    aq = ActQuantizer(QuantConfig(), 16, 'a').to(CUDA)
    aq.set_state(QState.CALIBRATING)
    aq(torch.randn(32, 16, device=CUDA))
    aq.finish_calibration()
    assert aq.scale.device.type == 'cuda' and bool(aq.initialized)
    x = torch.randn(32, 16, device=CUDA, requires_grad=True)
    aq(x).sum().backward()
    assert aq.scale.grad is not None and aq.scale.grad.device.type == 'cuda'


def test_qwt_sums_accept_cuda_rows():
    torch.manual_seed(0)
    x = torch.randn(400, 12)
    w = torch.randn(12, 6)
    r = x @ w + 0.01 * torch.randn(400, 6)
    fit_c, fit_g = QwTSums(12, 6), QwTSums(12, 6)
    fit_c.update(x, r)
    fit_g.update(x.to(CUDA), r.to(CUDA))
    torch.testing.assert_close(fit_g.xx.cpu(), fit_c.xx)
    torch.testing.assert_close(fit_g.xr.cpu(), fit_c.xr)
    a, b = fit_qwt(fit_c, None, 1e-2), fit_qwt(fit_g, None, 1e-2)
    assert a.kept == b.kept
