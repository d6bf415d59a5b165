"""Fused / recomputing quantization paths against unfused references.

Every fused path (``lsq_linear``, ``lsq_conv2d``, ``quant_attention``, the
LSQ backward and the in-place log-sqrt2 quantizer) is compared with a
reference built from plain differentiable torch ops, so that autograd -- not
the code under test -- derives the reference gradients:

* LSQ (Esser et al. 2019) as ``round_ste(clamp(x / s', qmin, qmax)) * s'``
  with ``s' = s.detach() + (s g - (s g).detach())`` (value ``s``, gradient
  ``g``);
* log-sqrt2 with a straight-through gradient as ``x + (Q(x) - x).detach()``.

Gradients of the input, weight, bias and scale must agree to a tight
tolerance, for per-channel, per-token and per-tensor quantizers, in float32
and bfloat16, with the chunked code paths forced on (tiny chunk sizes).
"""
import pytest
import torch
import torch.nn.functional as F

from gplq_mm.quant import functional as QF
from gplq_mm.quant import int4 as QI
from gplq_mm.quant import kernels as QK
from gplq_mm.quant import workspace as QW
from gplq_mm.quant import (QConv2d, QLinear, QuantConfig, fake_quantize_lsq,
                           log2_dequantize, log2_quantize, lsq_linear)
from gplq_mm.quant.functional import lsq_grad_factor, scale_view
from gplq_mm.quant.kernels import lsq_conv2d, quant_attention
from saved_tensors import ptrs, saved_tensors

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------
def ref_lsq(x, s, qmin, qmax, g):
    """LSQ through autograd of standard ops (an independent reference)."""
    sg = s * g
    s = s.detach() + (sg - sg.detach())  # value exactly s, gradient g
    v = x / s
    # clamp passing the gradient at the bounds too (LSQ's "inside" is
    # qmin <= v <= qmax; torch.clamp's own backward excludes the bounds)
    inside = (v >= qmin) & (v <= qmax)
    v = torch.where(inside, v, v.detach().clamp(qmin, qmax))
    return ((torch.round(v) - v).detach() + v) * s


def ref_fq_value(x, s, qmin, qmax):
    """The forward value, written as the original (out-of-place) ops."""
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


def ref_log2_ste(x, s, bits):
    q = log2_dequantize(log2_quantize(x, s, bits), s, bits)
    return x + (q - x).detach()


def _close(a, r, dtype, what=''):
    """Compare relative to the reference's largest entry."""
    assert a.dtype == r.dtype, what
    assert a.shape == r.shape, what
    scale = r.detach().abs().max().float().item() + 1e-12
    torch.testing.assert_close(a.detach().float() / scale,
                               r.detach().float() / scale, rtol=TOL[dtype],
                               atol=TOL[dtype], msg=lambda m: f'{what}: {m}')


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_()
            for t in ts]


def _grads(ts):
    return [None if t is None else t.grad for t in ts]


@pytest.fixture(params=['unchunked', 'chunked'])
def chunking(request, monkeypatch):
    """Run a test with the default chunk sizes and with tiny ones (many
    chunks, uneven last chunk), and with the scratch workspace on."""
    if request.param == 'chunked':
        monkeypatch.setattr(QK, 'LINEAR_CHUNK_ELEMS', 37)
        monkeypatch.setattr(QK, 'ATTN_CHUNK_ELEMS', 200)
    return request.param


def _scale(n, dtype):
    return (torch.rand(n) * 0.3 + 0.1).to(dtype)


# --------------------------------------------------------------------------
# LSQ fake quantization (forward bitwise, backward vs reference)
# --------------------------------------------------------------------------
CASES = [
    # name, x shape, number of scales, axis
    ('per_tensor', (3, 5, 8), 1, None),
    ('per_channel', (3, 5, 8), 8, -1),
    ('per_channel_axis1_4d', (2, 4, 5, 3), 4, 1),
    ('per_token', (2, 3, 7, 8), 7, -2),
]


@pytest.mark.parametrize('name,shape,n,axis', CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_lsq_fake_quant_matches_reference(name, shape, n, axis, dtype):
    x = (torch.randn(shape) * 2).to(dtype)
    s = _scale(n, dtype)
    up = torch.randn(shape).to(dtype)
    g = lsq_grad_factor(x.numel(), n, 7)
    xa, sa = _leaves(x, s)
    y = fake_quantize_lsq(xa, scale_view(sa, x.ndim, axis), -8, 7)
    y.backward(up)
    xr, sr = _leaves(x, s)
    yr = ref_lsq(xr, scale_view(sr, x.ndim, axis), -8, 7, g)
    yr.backward(up)
    # forward: bitwise the original expression
    assert torch.equal(y, ref_fq_value(x, scale_view(s, x.ndim, axis), -8, 7))
    _close(xa.grad, xr.grad, dtype, 'grad x')
    _close(sa.grad, sr.grad, dtype, 'grad scale')
    assert (xa.grad == 0).any() and (xa.grad != 0).any()  # some clip


def test_lsq_unsigned_and_8bit_grads():
    x = torch.randn(4, 6) * 3
    s = _scale(6, torch.float32)
    for qmin, qmax in ((0, 15), (-128, 127), (-2, 1)):
        g = lsq_grad_factor(x.numel(), 6, qmax)
        xa, sa = _leaves(x, s)
        fake_quantize_lsq(xa, sa, qmin, qmax).sum().backward()
        xr, sr = _leaves(x, s)
        ref_lsq(xr, sr, qmin, qmax, g).sum().backward()
        _close(xa.grad, xr.grad, torch.float32, f'x {qmin},{qmax}')
        _close(sa.grad, sr.grad, torch.float32, f's {qmin},{qmax}')


# --------------------------------------------------------------------------
# lsq_linear
# --------------------------------------------------------------------------
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('frozen', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_lsq_linear_matches_reference(chunking, gran, bias, frozen, dtype):
    x = (torch.randn(3, 11, 16) * 2).to(dtype)
    s = _scale(16 if gran == 'per_channel' else 1, dtype)
    if gran == 'per_tensor':
        s = s.reshape(())
    w = (torch.randn(9, 16) * 0.2).to(dtype)
    b = torch.randn(9).to(dtype) if bias else None
    up = torch.randn(3, 11, 9).to(dtype)
    g = lsq_grad_factor(x.numel(), s.numel(), 7)

    ts = _leaves(x, s, w, b)
    if frozen:
        ts[1].requires_grad_(False)
    y = lsq_linear(ts[0], ts[1], ts[2], ts[3], -8, 7)
    y.backward(up)
    rs = _leaves(x, s, w, b)
    if frozen:
        rs[1].requires_grad_(False)
    yr = F.linear(ref_lsq(rs[0], rs[1], -8, 7, g), rs[2], rs[3])
    yr.backward(up)

    _close(y, F.linear(ref_fq_value(x, s, -8, 7), w, b), dtype, 'forward')
    for what, a, r in zip(('x', 'scale', 'weight', 'bias'), _grads(ts),
                          _grads(rs)):
        if r is None:
            assert a is None, what
            continue
        _close(a, r, dtype, what)


def test_fused_outputs_can_be_modified_in_place(chunking):
    """Outputs are not views (mmdet's RoI head applies ReLU(inplace=True))."""
    x = torch.randn(4, 30, 16, requires_grad=True)
    s = _scale(16, torch.float32).requires_grad_()
    w = torch.randn(8, 16, requires_grad=True)
    y = lsq_linear(x, s, w, None, -8, 7)
    torch.relu_(y).sum().backward()
    qkv = torch.randn(3, 2, 2, 5, 4, requires_grad=True)
    o = quant_attention(qkv[0], qkv[1], qkv[2], 0.5)
    o.mul_(2).sum().backward()
    assert x.grad is not None and qkv.grad is not None


def test_lsq_linear_only_weight_grad(chunking):
    """Input without grad, frozen scale: only the weight (and bias) learn."""
    x = torch.randn(5, 16)
    s = _scale(16, torch.float32)
    w, b = _leaves(torch.randn(4, 16), torch.randn(4))
    lsq_linear(x, s, w, b, -8, 7).pow(2).sum().backward()
    wr, br = _leaves(w, b)
    F.linear(ref_fq_value(x, s, -8, 7), wr, br).pow(2).sum().backward()
    _close(w.grad, wr.grad, torch.float32, 'weight')
    _close(b.grad, br.grad, torch.float32, 'bias')


# --------------------------------------------------------------------------
# lsq_conv2d
# --------------------------------------------------------------------------
CONV = [
    # cin, cout, kernel, stride, padding, dilation, groups
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, 0, 1, 2),
    (3, 8, 4, 4, 0, 1, 1),  # patch embedding
    (6, 6, 3, 1, 2, 2, 3),
]


@pytest.mark.parametrize('cin,cout,k,stride,pad,dil,groups', CONV)
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_lsq_conv2d_matches_reference(cin, cout, k, stride, pad, dil, groups,
                                      gran, dtype):
    x = (torch.randn(2, cin, 9, 10) * 2).to(dtype)
    s = _scale(cin if gran == 'per_channel' else 1, dtype)
    w = (torch.randn(cout, cin // groups, k, k) * 0.2).to(dtype)
    b = torch.randn(cout).to(dtype)
    g = lsq_grad_factor(x.numel(), s.numel(), 7)
    ts = _leaves(x, s, w, b)
    y = lsq_conv2d(ts[0], ts[1], ts[2], ts[3], stride, pad, dil, groups, -8, 7)
    up = torch.randn(y.shape).to(dtype)
    y.backward(up)
    rs = _leaves(x, s, w, b)
    sv = rs[1].reshape(-1, 1, 1) if gran == 'per_channel' else \
        rs[1].reshape(())
    yr = F.conv2d(ref_lsq(rs[0], sv, -8, 7, g), rs[2], rs[3], stride, pad,
                  dil, groups)
    yr.backward(up)
    _close(y, yr, dtype, 'forward')
    for what, a, r in zip(('x', 'scale', 'weight', 'bias'), _grads(ts),
                          _grads(rs)):
        _close(a, r, dtype, what)


def test_qconv2d_uses_fused_path_and_matches_module_reference():
    conv = torch.nn.Conv2d(4, 5, 3, padding=1)
    q = QConv2d.from_float(conv, QuantConfig())
    q.act_quant.scale.data = _scale(4, torch.float32)
    q.act_quant.initialized.fill_(True)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y, saved = saved_tensors(lambda: q(x))
    # the input itself, no quantized copy of it
    big = [t for t in saved if t.numel() >= x.numel()]
    assert ptrs(big) == ptrs([x])
    y.sum().backward()
    gx, gs, gw = x.grad, q.act_quant.scale.grad, q.weight.grad
    x.grad = q.act_quant.scale.grad = q.weight.grad = None
    # the op-by-op module path: quantizer then convolution
    F.conv2d(q.act_quant(x), q.weight, q.bias, padding=1).sum().backward()
    for a, r in ((gx, x.grad), (gs, q.act_quant.scale.grad),
                 (gw, q.weight.grad)):
        _close(a, r, torch.float32)


# --------------------------------------------------------------------------
# quant_attention
# --------------------------------------------------------------------------
def _attention(q, k, v, mult, qz, kz, vz, pz, bias, mask, lsq, log2):
    """Quantized attention op by op; ``lsq(x, s, qmin, qmax)`` and
    ``log2(p, s, bits)`` are the fake quantizers to use."""
    def fq(x, z):
        return x if z is None else lsq(x, z[0], z[1], z[2])

    attn = fq(q * mult, qz) @ fq(k, kz).transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        b_, h, n, m = attn.shape
        nw = mask.shape[0]
        attn = (attn.view(b_ // nw, nw, h, n, m) +
                mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, m)
    p = attn.softmax(-1)
    if pz is not None and pz[0] == 'log2':
        p = log2(p, pz[1], pz[2])
    elif pz is not None:
        p = lsq(p, pz[1], pz[2], pz[3])
    return p @ fq(v, vz)


def _ref_attention(*args):
    """Independent reference: LSQ and log2 STE through standard autograd."""
    def lsq(x, s, qmin, qmax):
        return ref_lsq(x, s, qmin, qmax,
                       lsq_grad_factor(x.numel(), s.numel(), qmax))

    return _attention(*args, lsq=lsq, log2=ref_log2_ste)


def _plain_attention(*args):
    """The unfused forward as the attention modules write it."""
    return _attention(*args, lsq=fake_quantize_lsq,
                      log2=QF.fake_quantize_log2)


def _qkv_scale(gran, shape, dtype):
    b_, h, n, d = shape
    if gran == 'per_token':
        return _scale(n, dtype).reshape(n, 1) * 4
    if gran == 'per_channel':
        return _scale(d, dtype) * 4
    return _scale(1, dtype).reshape(()) * 4


ATT = [
    # name, q/k/v granularity (None: float), softmax quantizer, swin-like
    ('token_log2', 'per_token', 'log2', False),
    ('channel_uniform', 'per_channel', 'uniform', False),
    ('tensor_none', 'per_tensor', None, False),
    ('float_log2', None, 'log2', False),
    ('swin_token_log2', 'per_token', 'log2', True),
    ('swin_channel_uniform', 'per_channel', 'uniform', True),
]


@pytest.mark.parametrize('name,gran,soft,swin', ATT, ids=[a[0] for a in ATT])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_quant_attention_matches_reference(chunking, name, gran, soft, swin,
                                           dtype):
    nw = 3
    shape = (2 * nw, 2, 9, 8) if swin else (4, 3, 11, 8)
    b_, h, n, d = shape
    qkv = (torch.randn((3, ) + shape) * 1.5).to(dtype)
    scales = [None if gran is None else _qkv_scale(gran, shape, dtype)
              for _ in range(3)]
    sp = torch.tensor(1.0 if soft == 'log2' else 1 / 15).to(dtype)
    bias = (torch.randn(1, h, n, n) * 0.5).to(dtype) if swin else None
    mask = None
    if swin:
        mask = torch.zeros(nw, n, n)
        mask[1:, :4, 4:] = -100.0
        mask[1:, 4:, :4] = -100.0
        mask = mask.to(dtype)
    mult = d**-0.5
    up = torch.randn(shape).to(dtype)

    def run(fn, leaves):
        q, k, v, bs, s1, s2, s3, s4 = leaves
        zs = [None if s is None else (s, -8, 7) for s in (s1, s2, s3)]
        pz = None if soft is None else (
            ('log2', s4.detach(), 4) if soft == 'log2' else
            ('uniform', s4, 0, 15))
        out = fn(q, k, v, mult, *zs, pz, bs, mask)
        out.backward(up)
        return out

    def fused(q, k, v, mult, qz, kz, vz, pz, bs, mask):
        return quant_attention(q, k, v, mult, qz, kz, vz, pz, bias=bs,
                               mask=mask)

    def run64(leaves):
        q, k, v, bs, s1, s2, s3, s4 = leaves
        zs = [None if s is None else (s, -8, 7) for s in (s1, s2, s3)]
        pz = None if soft is None else (
            ('log2', s4.detach(), 4) if soft == 'log2' else
            ('uniform', s4, 0, 15))
        m64 = None if mask is None else mask.double()
        _ref_attention(q, k, v, mult, *zs, pz, bs, m64).backward(up.double())

    la = _leaves(qkv[0], qkv[1], qkv[2], bias, *scales, sp)
    lr = _leaves(qkv[0], qkv[1], qkv[2], bias, *scales, sp)
    if soft != 'uniform':
        la[7].requires_grad_(False)
        lr[7].requires_grad_(False)
    y = run(fused, la)
    yr = run(_ref_attention, lr)
    with torch.no_grad():  # forward: bitwise the op-by-op forward
        zs = [None if s is None else (s, -8, 7) for s in scales]
        pz = None if soft is None else (
            ('log2', sp, 4) if soft == 'log2' else ('uniform', sp, 0, 15))
        plain = _plain_attention(qkv[0], qkv[1], qkv[2], mult, *zs, pz, bias,
                                 mask)
    assert torch.equal(y, plain) or chunking == 'chunked'
    _close(y, yr, dtype, 'forward')
    names = ('q', 'k', 'v', 'bias', 'scale q', 'scale k', 'scale v',
             'scale softmax')
    truth = None
    for n, (what, a, r) in enumerate(zip(names, _grads(la), _grads(lr))):
        if r is None:
            assert a is None, what
            continue
        if dtype == torch.bfloat16 and r.numel() == 1:
            # A per-tensor scale gradient sums ~1000 terms.  The op-by-op
            # bf16 reference gets it as two large cancelling sums (sum g*q -
            # sum g*v), each rounded to bf16; the fused path sums
            # g * (q - v) directly.  Require the fused result to be at least
            # as close to a float64 evaluation as the reference is.
            if truth is None:
                ld = _leaves(*[None if t is None else t.double() for t in
                               (qkv[0], qkv[1], qkv[2], bias, *scales, sp)])
                if soft != 'uniform':
                    ld[7].requires_grad_(False)
                run64(ld)
                truth = _grads(ld)
            t = truth[n].float()
            err_fused = (a.float() - t).abs().item()
            err_ref = (r.float() - t).abs().item()
            assert err_fused <= max(1.5 * err_ref, TOL[dtype] * t.abs().item()
                                    ), (what, a, r, t)
            continue
        _close(a, r, dtype, what)


def test_quant_attention_saves_only_qkv_and_scales():
    shape = (4, 2, 10, 8)
    qkv = torch.randn((3, ) + shape, requires_grad=True)
    q, k, v = qkv[0], qkv[1], qkv[2]
    ss = [(_scale(10, torch.float32).reshape(10, 1) * 4).requires_grad_()
          for _ in range(3)]
    sp = torch.tensor(1.0)
    out, saved = saved_tensors(lambda: quant_attention(
        q, k, v, 0.3, (ss[0], -8, 7), (ss[1], -8, 7), (ss[2], -8, 7),
        ('log2', sp, 4)))
    # nothing of shape [B, h, N, N] and no quantized copies: q, k, v (views
    # of qkv) and the scales only
    assert all(t.shape != (4, 2, 10, 10) for t in saved)
    assert {t.untyped_storage().data_ptr() for t in saved if t.numel() > 10} \
        == {qkv.untyped_storage().data_ptr()}
    out.sum().backward()
    assert qkv.grad is not None and all(s.grad is not None for s in ss)


def test_quant_attention_rejects_mixed_dtypes():
    q = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match='one dtype'):
        quant_attention(q, q, q, 1.0, bias=torch.zeros(1, 1, 4, 4,
                                                       dtype=torch.float64))


# --------------------------------------------------------------------------
# log-sqrt2 fast path, scratch workspace
# --------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16,
                                   torch.float16])
def test_exp2_equals_pow_on_every_log2_level(dtype):
    """The claim behind using exp2: same bits as pow(2, .) on -k/2."""
    t = (-torch.arange(0, 256, dtype=torch.float64) / 2).to(dtype)
    t = t.repeat(9)[torch.randperm(256 * 9)]  # vector body and tail
    assert torch.equal(QF._exp2(t), torch.pow(2.0, t))


@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_log2_fast_path_is_bitwise_the_reference(bits, dtype):
    x = torch.cat([torch.rand(500), torch.rand(100) * 1e-6,
                   torch.tensor([0.0, -0.3, 1.0, 1e-38, 1e-30, 2.0])])
    x = x.to(dtype)
    for s in (torch.tensor(1.0), torch.tensor(0.37)):
        s = s.to(dtype)
        ref = log2_dequantize(log2_quantize(x, s, bits), s, bits)
        assert torch.equal(QF._log2_fake_quant(x, s, bits), ref)
        assert torch.equal(QF.fake_quantize_log2(x, s, bits), ref)


def test_workspace_off_gives_identical_results(monkeypatch):
    def run():
        torch.manual_seed(0)
        x = torch.randn(6, 20, 16, requires_grad=True)
        s = _scale(16, torch.float32).requires_grad_()
        w = torch.randn(12, 16, requires_grad=True)
        y = lsq_linear(x, s, w, None, -8, 7)
        qkv = y.reshape(6, 20, 3, 2, 2).permute(2, 0, 3, 1, 4)
        st = (_scale(20, torch.float32).reshape(20, 1) * 4).requires_grad_()
        o = quant_attention(qkv[0], qkv[1], qkv[2], 0.5, (st, -8, 7),
                            (st, -8, 7), (st, -8, 7),
                            ('log2', torch.tensor(1.0), 4))
        o.pow(2).sum().backward()
        return [o.detach(), x.grad, s.grad, w.grad, st.grad]

    monkeypatch.setattr(QK, 'LINEAR_CHUNK_ELEMS', 50)
    monkeypatch.setattr(QK, 'ATTN_CHUNK_ELEMS', 900)
    with_ws = run()
    monkeypatch.setattr(QW, 'WORKSPACE', False)
    without = run()
    for a, b in zip(with_ws, without):
        assert torch.equal(a, b)
    QW.clear_workspace()


# --------------------------------------------------------------------------
# module level: the attention forwards of mmdet / mmpretrain
# --------------------------------------------------------------------------
def _calibrate(mod, *inputs):
    from gplq_mm.quant import set_act_state
    set_act_state(mod, 'calibrating')
    with torch.no_grad():
        mod(*inputs)
    for m in mod.modules():
        if hasattr(m, 'finish_calibration') and m.observer is not None:
            m.finish_calibration()


@pytest.mark.parametrize('which', ['mmdet_window', 'mmpretrain_window',
                                   'mmpretrain_mha'])
def test_attention_modules_fused_equals_op_by_op(which, monkeypatch):
    pytest.importorskip('mmdet')
    pytest.importorskip('mmpretrain')
    from gplq_mm.models import attention as A
    from gplq_mm.quant import ActQuantizer, QuantConfig
    if which == 'mmdet_window':
        from mmdet.models.backbones.swin import WindowMSA
        mod = WindowMSA(16, 2, (3, 3))
        x = torch.randn(2 * 4, 9, 16)
        mask = torch.zeros(4, 9, 9)
        mask[2:, :5, 5:] = -100.0
        args = (x, mask)
        n_tok = 9
    elif which == 'mmpretrain_window':
        from mmpretrain.models.utils.attention import WindowMSA
        mod = WindowMSA(16, (3, 3), 2)
        x = torch.randn(6, 9, 16)
        args = (x, None)
        n_tok = 9
    else:
        from mmpretrain.models.utils.attention import MultiheadAttention
        mod = MultiheadAttention(16, 2)
        x = torch.randn(3, 7, 16)
        args = (x, )
        n_tok = 7
    A.quantize_attention(mod, QuantConfig(granularity='per_token',
                                          observer='percentile'),
                         QuantConfig(granularity='per_tensor', signed=False,
                                     kind='log2', learnable=False),
                         n_tok, 'attn')
    _calibrate(mod, *args)
    mod.train()

    def run(fused):
        monkeypatch.setattr(A, 'FUSED_ATTENTION', fused)
        for p in mod.parameters():
            p.grad = None
        xi = args[0].clone().requires_grad_()
        y = mod(xi, *args[1:])
        y.pow(2).sum().backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in
                                     mod.named_parameters()
                                     if p.grad is not None}

    calls = []
    orig = QK._QuantAttention.apply
    monkeypatch.setattr(QK._QuantAttention, 'apply',
                        lambda *a: calls.append(1) or orig(*a))
    y1, gx1, g1 = run(True)
    assert calls, 'the fused attention path did not run'
    y2, gx2, g2 = run(False)
    assert torch.equal(y1, y2)
    _close(gx1, gx2, torch.float32, 'grad x')
    assert set(g1) == set(g2)
    assert any(isinstance(m, ActQuantizer) and m.scale.requires_grad
               for m in mod.modules())
    for n in g2:
        _close(g1[n], g2[n], torch.float32, n)


def test_qlinear_frozen_inference_uses_fused_path():
    lin = torch.nn.Linear(16, 8)
    q = QLinear.from_float(lin, QuantConfig())
    q.act_quant.scale.data = _scale(16, torch.float32)
    q.act_quant.initialized.fill_(True)
    q.act_quant.set_state('frozen')
    x = torch.randn(3, 40, 16)
    with torch.no_grad():
        y = q(x)
    ref = F.linear(ref_fq_value(x, q.act_quant.scale, -8, 7), q.weight, q.bias)
    _close(y, ref, torch.float32)


# --------------------------------------------------------------------------
def test_unpack_int4_float_equals_unpack_int4():
    codes = torch.randint(-8, 8, (5, 37))
    packed = QI.pack_int4(codes)
    for length in (37, 36, 0):
        ref = QI.unpack_int4(packed, length).float()
        assert torch.equal(QI.unpack_int4_float(packed, length), ref)
    with pytest.raises(ValueError):
        QI.unpack_int4_float(packed, 39)


def test_quantize_in_place_path_is_bitwise_and_keeps_autograd():
    x = torch.randn(7, 9) * 3
    s = _scale(9, torch.float32)
    ref = torch.clamp(torch.round(x / s), -8, 7)
    assert torch.equal(QF.quantize(x, s, -8, 7), ref)
    xg = x.clone().requires_grad_()
    assert torch.equal(QF.quantize(xg, s, -8, 7), ref)  # no in-place on xg
