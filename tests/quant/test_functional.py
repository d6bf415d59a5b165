"""Pure functions of gplq_mm.quant.functional against independent references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gplq_mm.quant import (QuantConfig, WeightQuantConfig, choose_qparams,
                           fake_quantize, fake_quantize_log2,
                           fake_quantize_lsq, lsq_linear, pack_int4, quantize,
                           search_weight_scale, unpack_int4)
from gplq_mm.quant.functional import scale_view
from saved_tensors import ptrs, saved_tensors

# Grid bounds written out by hand (not computed by the code under test).
SIGNED = {2: (-2, 1), 4: (-8, 7), 8: (-128, 127)}
UNSIGNED = {2: (0, 3), 4: (0, 15), 8: (0, 255)}


# --------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_config_grid_bounds(bits):
    cfg = QuantConfig(bits=bits)
    assert (cfg.qmin, cfg.qmax) == SIGNED[bits]
    ucfg = QuantConfig(bits=bits, signed=False)
    assert (ucfg.qmin, ucfg.qmax) == UNSIGNED[bits]
    wcfg = WeightQuantConfig(bits=bits)
    assert (wcfg.qmin, wcfg.qmax) == SIGNED[bits]


def test_fake_quant_hand_values_4bit_signed():
    s = torch.tensor(0.5)  # power of two: x / s is exact
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 3.51, 7.4, 7.5,
                      8.0, 100.0, -8.4, -8.5, -9.0, -1e6])
    # half-to-even, then clamp to [-8, 7] (written out by hand)
    codes = torch.tensor([0., 2., 2., -0., -2., -2., 0., 4., 7., 7., 7., 7.,
                          -8., -8., -8., -8.])
    y = fake_quantize_lsq(v * s, s, -8, 7)
    assert torch.equal(y, codes * s)
    assert torch.equal(quantize(v * s, s, -8, 7), codes)
    assert torch.equal(fake_quantize(v * s, s, -8, 7), codes * s)


def test_fake_quant_hand_values_4bit_unsigned():
    s = torch.tensor(0.25)
    v = torch.tensor([-3.0, -0.4, 0.5, 1.5, 14.5, 15.49, 15.5, 16.0, 1000.0])
    codes = torch.tensor([0., 0., 0., 2., 14., 15., 15., 15., 15.])
    assert torch.equal(fake_quantize_lsq(v * s, s, 0, 15), codes * s)


@pytest.mark.parametrize('bits', [2, 4, 8])
@pytest.mark.parametrize('signed', [True, False])
def test_fake_quant_matches_numpy_and_covers_full_grid(bits, signed):
    qmin, qmax = SIGNED[bits] if signed else UNSIGNED[bits]
    s = 0.125
    # dense sweep reaching well past both ends, plus exact half points
    v = np.concatenate([np.linspace(qmin - 5.3, qmax + 5.3, 4001),
                        np.arange(qmin - 3, qmax + 3) + 0.5])
    x = torch.tensor(v * s, dtype=torch.float32)
    y = fake_quantize_lsq(x, torch.tensor(s), qmin, qmax)
    ref = np.clip(np.round(v), qmin, qmax) * s  # np.round: half-to-even
    np.testing.assert_array_equal(y.numpy(), ref.astype(np.float32))
    levels = torch.unique(y)
    expected = torch.arange(qmin, qmax + 1, dtype=torch.float32) * s
    assert torch.equal(levels, expected)  # exactly 2^bits levels, all reached


def test_per_channel_grid_uses_each_channels_scale():
    s = torch.tensor([0.5, 2.0, 0.125])
    x = torch.tensor([[1.3, 1.3, 1.3], [-100.0, 3.0, 0.3]])
    y = fake_quantize_lsq(x, s, -8, 7)
    # by hand: 1.3/0.5=2.6->3 ; 1.3/2=0.65->1 ; 1.3/.125=10.4->7
    #          -200->-8 ; 1.5->2 ; 2.4->2
    ref = torch.tensor([[1.5, 2.0, 0.875], [-4.0, 4.0, 0.25]])
    assert torch.equal(y, ref)


# --------------------------------------------------------------------------
# LSQ gradients
# --------------------------------------------------------------------------
def test_lsq_grad_hand_example():
    x = torch.tensor([0.3, -1.0, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    fake_quantize_lsq(x, s, -8, 7).sum().backward()
    # v = [0.6, -2, 10]: inside, inside, above
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))
    # ds = [round(.6)-.6, round(-2)+2, qmax] = [0.4, 0, 7]; g = 1/sqrt(3*7)
    assert s.grad.item() == pytest.approx(7.4 / math.sqrt(21), rel=1e-6)

    x.grad = s.grad = None
    fake_quantize_lsq(x, s, -8, 7, grad_factor=1.0).sum().backward()
    assert s.grad.item() == pytest.approx(7.4, rel=1e-6)


def test_lsq_grad_boundaries_are_inside():
    s = torch.tensor(0.25, requires_grad=True)
    # v = qmin, qmax exactly (inside), and just beyond each (outside)
    v = torch.tensor([-8.0, 7.0, -8.0 - 2**-10, 7.0 + 2**-10])
    x = (v * 0.25).requires_grad_()
    up = torch.tensor([1.0, 2.0, 3.0, 4.0])
    fake_quantize_lsq(x, s, -8, 7).backward(up)
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 0.0, 0.0]))
    # inside on the grid: round(v) - v = 0; below: qmin; above: qmax;
    # N = 4 elements share the scale
    ref = (3.0 * -8 + 4.0 * 7) / math.sqrt(4 * 7)
    assert s.grad.item() == pytest.approx(ref, rel=1e-6)


def _lsq_reference(x, s_b, up, qmin, qmax, reduce_axes, n_scales):
    """Hand-written LSQ gradients in numpy (float64)."""
    v = x / s_b
    inside = (v >= qmin) & (v <= qmax)
    gx = up * inside
    ds = np.where(v < qmin, qmin, np.where(v > qmax, qmax, np.round(v) - v))
    g = 1.0 / np.sqrt(x.size / n_scales * qmax)
    gs = (up * ds).sum(axis=reduce_axes) * g
    return gx, gs


CASES = [
    # name, x shape, scale entries, axis, numpy axes summed over
    ('per_tensor', (3, 4, 5), 1, None, (0, 1, 2)),
    ('per_channel_last', (3, 4, 5), 5, -1, (0, 1)),
    ('per_channel_axis1_4d', (2, 3, 4, 5), 3, 1, (0, 2, 3)),
    ('per_token', (3, 4, 5), 4, -2, (0, 2)),
]


@pytest.mark.parametrize('name,shape,n,axis,red', CASES,
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_lsq_grads_match_reference(name, shape, n, axis, red, bits):
    qmin, qmax = SIGNED[bits]
    # |x / s| ~ 0.6 * 2^(b-1): some entries clip, most do not
    x = torch.randn(shape, dtype=torch.float64) * 0.3 * 0.6 * (qmax + 1)
    scale = torch.rand(n, dtype=torch.float64) * 0.4 + 0.1
    up = torch.randn(shape, dtype=torch.float64)
    xt = x.clone().requires_grad_()
    st = scale.clone().requires_grad_()
    y = fake_quantize_lsq(xt, scale_view(st, xt.ndim, axis), qmin, qmax)
    y.backward(up)

    pos = None if axis is None else axis % len(shape)
    bshape = [1] * len(shape)
    if pos is not None:
        bshape[pos] = n
    s_b = scale.numpy().reshape(bshape) if pos is not None \
        else scale.numpy().reshape(())
    gx, gs = _lsq_reference(x.numpy(), s_b, up.numpy(), qmin, qmax, red, n)
    v = x.numpy() / s_b
    clipped = (v < qmin) | (v > qmax)
    assert clipped.any() and (~clipped).mean() > 0.3, 'need both cases'
    np.testing.assert_allclose(xt.grad.numpy(), gx, rtol=0, atol=0)
    np.testing.assert_allclose(st.grad.numpy(), np.reshape(gs, -1),
                               rtol=1e-10, atol=1e-12)
    # forward against numpy too
    np.testing.assert_allclose(
        y.detach().numpy(), np.clip(np.round(v), qmin, qmax) * s_b, rtol=0,
        atol=1e-15)


def test_lsq_grads_float32_match_reference():
    x = torch.randn(6, 8) * 2
    scale = torch.rand(8) * 0.4 + 0.1
    up = torch.randn(6, 8)
    xt, st = x.clone().requires_grad_(), scale.clone().requires_grad_()
    fake_quantize_lsq(xt, st, -8, 7).backward(up)
    gx, gs = _lsq_reference(x.numpy().astype(np.float64),
                            scale.numpy().astype(np.float64),
                            up.numpy().astype(np.float64), -8, 7, (0, ), 8)
    np.testing.assert_allclose(xt.grad.numpy(), gx, atol=0)
    np.testing.assert_allclose(st.grad.numpy(), gs, rtol=1e-5, atol=1e-6)


def test_fake_quantize_gives_no_scale_grad():
    x = torch.randn(4, 3, requires_grad=True)
    s = torch.full((3, ), 0.2, requires_grad=True)
    fake_quantize(x, s, -8, 7).sum().backward()
    assert s.grad is None
    inside = ((x / s).detach().abs() <= 7) & ((x / s).detach() >= -8)
    assert torch.equal(x.grad, inside.float())


# --------------------------------------------------------------------------
# saved tensors (memory)
# --------------------------------------------------------------------------
def test_lsq_fake_quant_saves_only_x_and_scale():
    x = torch.randn(4, 8, requires_grad=True)
    s = torch.rand(8).add(0.1).requires_grad_()
    y, packed = saved_tensors(lambda: fake_quantize_lsq(x, s, -8, 7))
    assert len(packed) == 2
    assert ptrs(packed) == ptrs([x, s])
    y.sum().backward()  # the saved tensors are enough for backward
    assert x.grad is not None and s.grad is not None


def test_lsq_linear_saves_x_scale_weight_only():
    x = torch.randn(2, 5, 8, requires_grad=True)
    s = torch.rand(8).add(0.1).requires_grad_()
    w = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    _, fused = saved_tensors(lambda: lsq_linear(x, s, w, b, -8, 7))
    assert len(fused) == 3
    assert ptrs(fused) == ptrs([x, s, w])
    _, unfused = saved_tensors(
        lambda: F.linear(fake_quantize_lsq(x, s, -8, 7), w, b))
    assert len(unfused) > len(fused)  # also keeps the quantized input


# --------------------------------------------------------------------------
# lsq_linear == unfused reference
# --------------------------------------------------------------------------
def _grads(fn, tensors, up):
    ts = [t.clone().requires_grad_() if t is not None else None
          for t in tensors]
    y = fn(*ts)
    y.backward(up)
    return y.detach(), [None if t is None else t.grad for t in ts]


@pytest.mark.parametrize('scale_kind', ['per_channel', 'per_tensor_0d',
                                        'per_tensor_1'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5),
                                       (torch.bfloat16, 3e-2)])
def test_lsq_linear_matches_unfused(scale_kind, bias, dtype, tol):
    x = (torch.randn(2, 7, 8) * 2).to(dtype)
    if scale_kind == 'per_channel':
        s = torch.rand(8) * 0.4 + 0.1
    elif scale_kind == 'per_tensor_0d':
        s = torch.tensor(0.3)
    else:
        s = torch.tensor([0.3])
    s = s.to(dtype)
    w = torch.randn(5, 8).to(dtype)
    b = torch.randn(5).to(dtype) if bias else None
    up = torch.randn(2, 7, 5).to(dtype)

    def fused(x, s, w, b):
        return lsq_linear(x, s, w, b, -8, 7)

    def unfused(x, s, w, b):
        return F.linear(fake_quantize_lsq(x, s, -8, 7), w, b)

    y1, g1 = _grads(fused, [x, s, w, b], up)
    y2, g2 = _grads(unfused, [x, s, w, b], up)
    assert y1.dtype == dtype and g1[1].shape == s.shape
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    for a, r in zip(g1, g2):
        if r is None:
            assert a is None
            continue
        assert a.dtype == r.dtype
        scale = r.abs().max().float().item() + 1e-12
        torch.testing.assert_close(a.float() / scale, r.float() / scale,
                                   rtol=tol, atol=tol)
    assert g1[1].abs().sum() > 0  # the scale really learns


def test_lsq_linear_frozen_scale():
    x = torch.randn(4, 6, requires_grad=True)
    s = torch.rand(6) + 0.1
    w = torch.randn(3, 6, requires_grad=True)
    lsq_linear(x, s.detach(), w, None, -8, 7).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    F.linear(fake_quantize(x, s, -8, 7), w).sum().backward()
    torch.testing.assert_close(gx, x.grad)


# --------------------------------------------------------------------------
# scales
# --------------------------------------------------------------------------
def test_choose_qparams_replaces_invalid_entries_with_median():
    absmax = torch.tensor([7.0, 0.0, 14.0, float('nan'), 21.0, float('inf')])
    s = choose_qparams(absmax, 7)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s.tolist() == pytest.approx([1.0, 2.0, 2.0, 2.0, 3.0, 2.0])
    s = choose_qparams(torch.zeros(3), 7)
    assert s.tolist() == [1.0, 1.0, 1.0]


def test_scale_view_shapes_and_bad_axis():
    s = torch.arange(1.0, 4.0)
    assert scale_view(s, 4, 1).shape == (3, 1, 1)
    assert scale_view(s, 3, -1).shape == (3, )
    assert scale_view(s, 3, -2).shape == (3, 1)
    assert scale_view(torch.tensor([2.0]), 3, -1).shape == ()
    with pytest.raises(ValueError, match='axis 5 does not exist'):
        scale_view(s, 3, 5)


def _chan_err(w, s, qmin, qmax):
    w = w.double()
    s = s.double()[:, None]
    return ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w)**2).sum(1)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_search_weight_scale_never_worse_than_absmax(bits):
    qmin, qmax = SIGNED[bits]
    w = torch.randn(32, 64)
    w[torch.arange(32), torch.randint(0, 64, (32, ))] *= 8  # outliers
    absmax_scale = w.abs().amax(1) / qmax
    s = search_weight_scale(w, qmin, qmax, axis=0)
    e_search = _chan_err(w, s, qmin, qmax)
    e_absmax = _chan_err(w, absmax_scale, qmin, qmax)
    assert (e_search <= e_absmax * (1 + 1e-6) + 1e-12).all()
    assert e_search.sum() < e_absmax.sum()  # clipping the outliers pays off
    ratio = s / absmax_scale
    assert (ratio >= 0.5 - 1e-6).all() and (ratio <= 1 + 1e-6).all()
    # num_candidates=1 is plain abs-max
    torch.testing.assert_close(
        search_weight_scale(w, qmin, qmax, num_candidates=1), absmax_scale)
    # another axis: same per-channel result
    torch.testing.assert_close(search_weight_scale(w.t(), qmin, qmax, axis=1),
                               s)


def test_search_weight_scale_conv_and_dead_channel():
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0
    s = search_weight_scale(w, -8, 7, axis=0)
    assert s.shape == (4, )
    assert torch.isfinite(s).all() and (s > 0).all()


# --------------------------------------------------------------------------
# int4 packing
# --------------------------------------------------------------------------
def test_pack_unpack_all_16_values_even_and_odd():
    vals = torch.arange(-8, 8)
    for codes in (vals, vals.flip(0), vals[:15], vals[1:], vals[:1]):
        packed = pack_int4(codes.float())
        assert packed.dtype == torch.uint8
        assert packed.shape[-1] == math.ceil(codes.numel() / 2)
        out = unpack_int4(packed, codes.numel())
        assert out.dtype == torch.int8
        assert torch.equal(out.long(), codes)
    # every ordered pair of values, 2-D with an odd last dim
    a, b = torch.meshgrid(vals, vals, indexing='ij')
    codes = torch.stack([a.reshape(-1), b.reshape(-1),
                         a.reshape(-1).flip(0)], dim=1)  # [256, 3]
    out = unpack_int4(pack_int4(codes.to(torch.int8)), 3)
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize('bad', [8.0, -9.0, 7.6, 65539.0, float('nan')])
def test_pack_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r'\[-8, 7\]'):
        pack_int4(torch.tensor([0.0, bad, 1.0]))


def test_unpack_rejects_impossible_length():
    with pytest.raises(ValueError, match='length'):
        unpack_int4(pack_int4(torch.zeros(4)), 5)


# --------------------------------------------------------------------------
# log2 quantizer (post-softmax)
# --------------------------------------------------------------------------
def test_log2_levels_are_exact_and_tiny_values_go_to_zero():
    s = torch.tensor(1.0)
    k = torch.arange(0, 15, dtype=torch.float32)
    levels = 2.0**(-k / 2)  # the 15 non-zero levels of 4 bits
    x = torch.cat([levels, torch.tensor([0.0, 1e-9])])
    y = fake_quantize_log2(x, s, 4)
    torch.testing.assert_close(y, torch.cat([levels, torch.zeros(2)]))
