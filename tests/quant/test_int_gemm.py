"""Integer GEMM backends of IntQLinear: the oneDNN int8 kernel against the
exact float reference, the prepacked-weight cache, and the fallbacks."""
import copy
import logging

import pytest
import torch
from torch import nn

from gplq_mm.quant import (IntQLinear, QLinear, QuantConfig, WeightQuantConfig,
                           set_int_gemm, to_integer)
from gplq_mm.quant import int_gemm as IG

needs_onednn = pytest.mark.skipif(not IG.onednn_available(),
                                  reason='no oneDNN int8 linear')


def int_layer(k=64, n=24, act=QuantConfig(), fold='pow2', spread=30.0):
    q = QLinear.from_float(nn.Linear(k, n), act)
    q.act_quant.set_state('calibrating')
    q(torch.randn(256, k) * torch.linspace(1, spread, k))
    q.act_quant.finish_calibration()
    return to_integer(q, WeightQuantConfig(bits=4, fold=fold), 'blk.fc')


def both(layer, x):
    out = {}
    for b in ('reference', 'onednn'):
        layer.int_gemm = b
        out[b] = layer(x)
    return out['reference'], out['onednn']


def test_code_range_and_zero_point():
    assert IG.code_range(-8, 7, 4) == (-128, 112)
    assert IG.zero_point_for(-128, 112) == 128
    assert IG.zero_point_for(0, 240) == 0          # unsigned 4-bit, shift 4
    assert IG.zero_point_for(-256, 224) is None    # 4-bit codes, shift 5
    assert IG.zero_point_for(-128, 127 * 2) is None


@needs_onednn
@pytest.mark.parametrize('fold', ['pow2', 'full'])
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
def test_onednn_equals_reference(fold, gran):
    layer = int_layer(act=QuantConfig(granularity=gran), fold=fold)
    x = torch.randn(3, 11, 64) * torch.linspace(1, 30, 64) * 1.5
    ref, fast = both(layer, x)
    assert torch.equal(ref, fast)
    # and both are the int64 GEMM of the codes
    xc = layer.shifted_codes(x, -1).to(torch.int64)
    acc = xc @ layer.weight_codes().to(torch.int64).t()
    assert torch.equal(fast, acc.float() * layer.weight_scale + layer.bias)


@needs_onednn
def test_extreme_codes_are_exact():
    """Largest shifted codes (-8 << 4 = -128, 7 << 4 = 112) against the
    largest weight codes, K = 4096: int32 sums of +-4.2e6, exact."""
    k = 4096
    layer = IntQLinear(k, 8, False, QuantConfig(), shift=True)
    layer.act_quant.scale.data.fill_(1.0)
    layer.act_quant.initialized.fill_(True)
    codes = torch.full((8, k), -8.0)
    codes[1::2] = 7.0
    layer.set_weight_codes(codes, torch.ones(8),
                           torch.full((k,), 4, dtype=torch.uint8))
    x = torch.full((2, k), -100.0)
    x[1] = 100.0
    ref, fast = both(layer, x)
    assert torch.equal(ref, fast)
    assert fast[0, 0].item() == k * (-128) * (-8)


@needs_onednn
def test_prepacked_weight_follows_the_layer():
    layer = int_layer()
    keys = list(layer.state_dict())
    x = torch.randn(5, 64) * 10
    layer.int_gemm = 'onednn'
    y0 = layer(x)
    assert layer._gemm[1] is not None
    # not state: the checkpoint format does not change
    assert list(layer.state_dict()) == keys
    # new weight codes: the cache is rebuilt, the output follows
    codes = -layer.weight_codes()
    codes[codes > 7] = 7
    layer.set_weight_codes(codes, layer.weight_scale.clone(),
                           layer.input_shift.clone())
    y1 = layer(x)
    layer.int_gemm = 'reference'
    assert torch.equal(y1, layer(x)) and not torch.equal(y0, y1)
    # a loaded state_dict too
    other = int_layer()
    layer.int_gemm = 'onednn'
    layer(x)
    layer.load_state_dict(other.state_dict())
    other.int_gemm = 'reference'
    assert torch.equal(layer(x), other(x))
    # deepcopy drops the opaque prepacked weight and rebuilds it
    twin = copy.deepcopy(layer)
    assert twin._gemm is None
    assert torch.equal(twin(x), layer(x))


def test_auto_falls_back_with_a_log_line(caplog):
    """8-bit activations shifted by up to 4 need 12 bits: float reference."""
    layer = int_layer(act=QuantConfig(bits=8))
    assert int(layer.input_shift.max()) > 0
    x = torch.randn(4, 64) * 10
    IG._warned.clear()
    with caplog.at_level(logging.WARNING, logger='gplq_mm'):
        y = layer(x)
    assert layer._gemm[1] is None
    assert 'blk.fc' in caplog.text and 'more than 8 bits' in caplog.text
    layer.int_gemm = 'reference'
    assert torch.equal(y, layer(x))
    layer.int_gemm = 'onednn'
    with pytest.raises(RuntimeError, match='int_gemm="onednn" cannot run'):
        layer(x)


def test_bad_backend_names_the_choices():
    model = nn.Sequential(int_layer())
    with pytest.raises(ValueError, match='auto'):
        set_int_gemm(model, 'int8')
    model[0].int_gemm = 'fast'
    with pytest.raises(ValueError, match="'onednn'"):
        model(torch.randn(2, 64))
    assert set_int_gemm(model, 'reference') == 1
