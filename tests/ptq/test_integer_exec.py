"""The converted W4A4 model is integer-executable, layer by layer.

For every IntQLinear / IntQConv2d of a converted tiny model (inputs captured
during a real forward), the output must equal an explicit integer GEMM of the
activation codes, shifted left per input channel (``fold='pow2'``), and the
unpacked int4 weight codes (int64 arithmetic), times the per-output-channel
weight scale, plus the bias: ``y = d * ((Xc << e) @ Wc^T) + b``; the shifted
4-bit codes fit int8.  The packed format is decoded here
independently of the library (low nibble first, two's complement).
"""
import pytest
import torch
import torch.nn.functional as F

from gplq_mm.ptq.weight_ptq import integer_layers
from gplq_mm.quant import IntQConv2d, IntQLinear, set_int_gemm
from gplq_mm.quant.int_gemm import onednn_available


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 [out, ceil(n/2)] -> int64 [out, n], low nibble = even index."""
    p = packed.to(torch.int64)
    codes = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).flatten(-2)
    codes = torch.where(codes >= 8, codes - 16, codes)  # two's complement
    return codes[:, :length]


def act_codes(layer, x: torch.Tensor) -> torch.Tensor:
    """round(x / s) clamped to the activation grid, as int64 (s per channel)."""
    aq = layer.act_quant
    s = aq.scale.detach().clamp_min(1e-8)
    if aq.cfg.axis is not None and s.numel() > 1:
        shape = [1] * x.ndim
        shape[aq.cfg.axis] = -1
        s = s.reshape(shape)
    c = torch.clamp(torch.round(x / s), aq.cfg.qmin, aq.cfg.qmax)
    return c.to(torch.int64)


def int_reference(layer, x: torch.Tensor) -> torch.Tensor:
    codes = act_codes(layer, x)
    xc = codes
    if layer.input_shift is not None:  # fold='pow2' (the default)
        e = layer.input_shift.to(torch.int64)
        assert int(e.min()) >= 0 and int(e.max()) <= 4
        if e.numel() > 1:
            shape = [1] * x.ndim
            shape[layer.act_quant.cfg.axis] = -1
            e = e.reshape(shape)
        xc = codes << e
        # 4 more bits than the codes: an int8 (uint8 for an unsigned grid)
        # GEMM input for the 4-bit inputs
        cfg = layer.act_quant.cfg
        assert cfg.qmin * 16 <= int(xc.min()) and int(xc.max()) <= cfg.qmax * 16
    k = int(torch.Size(layer.weight_shape[1:]).numel())
    wc = unpack_nibbles(layer.weight_packed, k)  # int64 [out, k]
    assert int(wc.min()) >= -8 and int(wc.max()) <= 7
    if isinstance(layer, IntQLinear):
        acc = xc.reshape(-1, xc.shape[-1]) @ wc.t()  # int64 GEMM
        acc = acc.reshape(*x.shape[:-1], -1)
        d = layer.weight_scale.double()
        b = 0 if layer.bias is None else layer.bias.double()
    else:
        assert layer.groups == 1
        kh, kw = layer.weight_shape[2:]
        # im2col moves integers around only (exact in float64)
        cols = F.unfold(xc.double(), (kh, kw), dilation=layer.dilation,
                        padding=layer.padding, stride=layer.stride)
        acc = wc @ cols.to(torch.int64)  # [N, out, L] int64
        oh = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] *
              (kh - 1) - 1) // layer.stride[0] + 1
        acc = acc.reshape(x.shape[0], -1, oh, acc.shape[-1] // oh)
        d = layer.weight_scale.double().reshape(1, -1, 1, 1)
        b = 0 if layer.bias is None else \
            layer.bias.double().reshape(1, -1, 1, 1)
    # float32 simulation of the integer GEMM is exact below 2^24
    assert int(acc.abs().max()) < 2**24
    return acc.double() * d + b, codes


@pytest.mark.parametrize('case', ['cls', 'det'])
def test_integer_layers_equal_int64_gemm(request, case):
    data = request.getfixturevalue(f'{case}_case')
    model, _ = request.getfixturevalue(f'{case}_converted')
    layers = integer_layers(model.model)
    seen = {}

    def hook(name):
        def record(mod, inputs, out):  # returns None: output unchanged
            # clone: later in-place ops (ReLU(inplace=True)) modify tensors
            seen.setdefault(name, (inputs[0].clone(), out.clone()))
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            batch = data.batches[0]
            model(**model.data_preprocessor(batch, False), mode='tensor')
    finally:
        for h in hooks:
            h.remove()
    linears = [n for n, m in layers.items() if isinstance(m, IntQLinear)]
    assert linears and set(linears) <= set(seen)
    checked = 0
    for name, (x, y) in seen.items():
        layer = layers[name]
        if isinstance(layer, IntQConv2d) and layer.groups != 1:
            continue
        ref, xc = int_reference(layer, x)
        aq = layer.act_quant.cfg
        assert aq.qmin <= int(xc.min()) and int(xc.max()) <= aq.qmax, name
        torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5,
                                   msg=lambda m: f'{name}: {m}')
        checked += 1
    assert checked >= len(linears)


def test_int4_codes_fill_the_grid(cls_converted):
    """4-bit codes, two per byte, using the whole signed range somewhere."""
    model, _ = cls_converted
    for name, m in integer_layers(model.model).items():
        k = int(torch.Size(m.weight_shape[1:]).numel())
        assert m.weight_packed.shape == (m.weight_shape[0], (k + 1) // 2)
        wc = unpack_nibbles(m.weight_packed, k)
        assert torch.equal(wc.float().reshape(m.weight_shape),
                           m.weight_codes()), name
        assert int(wc.min()) <= -7 and int(wc.max()) >= 6, name
        assert bool((m.weight_scale > 0).all()), name


@pytest.mark.skipif(not onednn_available(), reason='no oneDNN int8 linear')
@pytest.mark.parametrize('case', ['cls', 'det'])
def test_int8_gemm_is_bit_exact_on_the_whole_model(request, case):
    """The oneDNN int8 GEMM and the float reference give the same bits."""
    data = request.getfixturevalue(f'{case}_case')
    model, _ = request.getfixturevalue(f'{case}_converted')
    inputs = model.data_preprocessor(data.batches[0], False)
    outs = {}
    try:
        for backend in ('reference', 'onednn'):
            assert set_int_gemm(model, backend) >= 2
            with torch.no_grad():
                outs[backend] = model(**inputs, mode='tensor')
    finally:
        set_int_gemm(model, 'auto')
    ref, fast = (torch.utils._pytree.tree_leaves(outs[b])
                 for b in ('reference', 'onednn'))
    assert len(ref) == len(fast) > 0
    for a, b in zip(ref, fast):
        assert torch.equal(a, b)
    # the fast path really ran: every linear holds a prepacked weight
    for m in integer_layers(model.model).values():
        if isinstance(m, IntQLinear):
            assert m._gemm is not None and m._gemm[1] is not None
