"""The lowering of gplq nodes into opset-21 operators, layer by layer, run in
onnxruntime against the PyTorch modules: rounding (half to even, as
QuantizeLinear), grids, the log-sqrt2 codes, and the integer layers bit for
bit."""
import numpy as np
import pytest
import torch
from torch import nn

from gplq_mm.quant import functional as QF
from gplq_mm.quant import (QConv2d, QLinear, QState, QuantConfig,
                           WeightQuantConfig, to_integer)
from gplq_mm.quant.quantizer import ActQuantizer

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
from gplq_mm.deploy.onnx_export import (CODES_PREFIX, ExportError,  # noqa
                                        export_onnx, lower_gplq_nodes,
                                        ort_session, torch_codes)


class Wrap(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        for m in self.mods:
            x = m(x)
        return x


def frozen(cfg, scale, name='q'):
    q = ActQuantizer(cfg, torch.as_tensor(scale).numel(), name)
    with torch.no_grad():
        q.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    q.initialized.fill_(True)
    q.set_state(QState.FROZEN)
    return q


def run_lowered(module, x, path):
    """Export ``module`` (no integer-layer requirement), lower it with codes,
    run it; returns (outputs, {name: codes})."""
    import io
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (x, ), buf, opset_version=21, dynamo=False,
                          input_names=['inputs'], output_names=['output'],
                          custom_opsets={'gplq': 1})
    proto = onnx.load_from_string(buf.getvalue())
    lower_gplq_nodes(proto, with_codes=True)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {'inputs': x.numpy()})))
    return res['output'], {n[len(CODES_PREFIX):]: v for n, v in res.items()
                           if n.startswith(CODES_PREFIX)}


@pytest.mark.parametrize('signed', [True, False])
def test_ties_round_half_to_even(tmp_path, signed):
    """x / s exactly k + 0.5: QuantizeLinear rounds to even, and so must the
    PyTorch codes (torch.round)."""
    cfg = QuantConfig(granularity='per_tensor', signed=signed,
                      observer='minmax')
    q = frozen(cfg, [0.25])
    lo = cfg.qmin - 2
    x = (torch.arange(lo, cfg.qmax + 2, dtype=torch.float32) + 0.5) * 0.25
    y, codes = run_lowered(Wrap(q), x.reshape(1, -1), str(tmp_path / 'q.onnx'))
    ref = q.codes(x.reshape(1, -1))
    assert np.array_equal(codes['q'], ref.numpy().astype(np.int8))
    assert ref[0, 2].item() == lo + 2  # e.g. -7.5 -> -8 (even), not -7
    assert np.array_equal(y, q(x.reshape(1, -1)).numpy())


@pytest.mark.parametrize('cfg,shape,nch', [
    (QuantConfig(granularity='per_channel', axis=-1), (2, 5, 16), 16),
    (QuantConfig(granularity='per_token', axis=-2), (2, 3, 7, 8), 7),
    (QuantConfig(bits=8, granularity='per_tensor'), (4, 9), 1),
])
def test_uniform_granularities(tmp_path, cfg, shape, nch):
    g = torch.Generator().manual_seed(0)
    q = frozen(cfg, torch.rand(nch, generator=g) * 0.3 + 0.05)
    x = torch.randn(*shape, generator=g) * 2
    y, codes = run_lowered(Wrap(q), x, str(tmp_path / 'q.onnx'))
    assert np.array_equal(codes['q'], q.codes(x).numpy().astype(np.int8))
    assert np.array_equal(y, q(x).numpy())


def test_log2_softmax_codes(tmp_path):
    """Codes and values equal PyTorch's, also at the code thresholds
    (where a runtime's own logarithm may round the other way)."""
    from gplq_mm.deploy.onnx_export import log2_thresholds
    cfg = QuantConfig(granularity='per_tensor', signed=False, kind='log2',
                      learnable=False)
    q = frozen(cfg, [0.5])  # a power of 2: x = r * s exactly
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, 3, 6, 6, generator=g) * 3, -1)
    x[0, 0, 0, :2] = 0.0  # exact zeros: the "zero" code
    b = torch.from_numpy(log2_thresholds(cfg.bits))
    below = torch.nextafter(b, torch.zeros_like(b))
    # ratios exactly at and one ulp below every threshold
    x[1, 2] = torch.cat([b, below, torch.ones(6)]).reshape(6, 6) * 0.5
    y, codes = run_lowered(Wrap(q), x, str(tmp_path / 'q.onnx'))
    _, ref = torch_codes(Wrap(q), x)
    top = 2**cfg.bits - 1
    assert np.array_equal(codes['q'], np.minimum(ref['q'].numpy(), top))
    r = x[1, 2].reshape(-1)[:2 * top] / 0.5
    k = QF.log2_quantize(r, torch.tensor(1.0), cfg.bits)
    assert k[:top].tolist() == list(range(top))  # at b[j]: code j
    assert k[top:].tolist() == list(range(1, top + 1))  # just below: j + 1
    assert np.array_equal(y, q(x).numpy())


def calibrated(mod, x, cfg):
    mod.act_quant.set_state('calibrating')
    mod(x)
    mod.act_quant.finish_calibration()
    return mod


@pytest.mark.parametrize('fold', ['pow2', 'full'])
@pytest.mark.parametrize('gran', ['per_channel', 'per_tensor'])
def test_int_linear_bit_exact(tmp_path, fold, gran):
    """An integer Linear exports as Q -> DQ(2^e) -> MatMul(INT4 codes) ->
    Mul d -> Add b; onnxruntime reproduces PyTorch bit for bit."""
    torch.manual_seed(0)
    cfg = QuantConfig(granularity=gran)
    x = torch.randn(3, 11, 64) * torch.linspace(1, 30, 64)
    q = calibrated(QLinear.from_float(nn.Linear(64, 24), cfg), x, cfg)
    layer = to_integer(q, WeightQuantConfig(bits=4, fold=fold), 'fc')
    info = export_onnx(Wrap(layer), x, str(tmp_path / 'fc.onnx'),
                       with_codes=True)
    assert info.int4_params == 64 * 24 and info.quantized_tensors == \
        ['fc.act_quant']
    sess = ort_session(str(tmp_path / 'fc.onnx'), optimization='all')
    y, codes = sess.run(None, {'inputs': x.numpy()})
    with torch.no_grad():
        ref = layer(x)
    assert np.array_equal(y, ref.numpy())
    assert np.array_equal(codes, layer.act_quant.codes(x).numpy())


def test_int_conv_bit_exact(tmp_path):
    torch.manual_seed(0)
    cfg = QuantConfig(granularity='per_channel', bits=8)
    x = torch.randn(2, 3, 20, 20) * torch.tensor([1., 5., 20.]).view(1, 3, 1, 1)
    conv = nn.Conv2d(3, 8, 4, stride=4, padding=1)
    q = calibrated(QConv2d.from_float(conv, cfg), x, cfg)
    layer = to_integer(q, WeightQuantConfig(bits=4), 'patch')
    export_onnx(Wrap(layer), x, str(tmp_path / 'c.onnx'), with_codes=True)
    y, codes = ort_session(str(tmp_path / 'c.onnx')).run(
        None, {'inputs': x.numpy()})
    with torch.no_grad():
        assert np.array_equal(y, layer(x).numpy())
    assert np.array_equal(codes, layer.act_quant.codes(x).numpy())


def test_grid_without_onnx_type_is_named(tmp_path):
    cfg = QuantConfig(bits=3, granularity='per_tensor')
    q = frozen(cfg, [0.1], name='backbone.layers.0.attn.q_quant')
    with pytest.raises(ExportError, match=r'backbone\.layers\.0\.attn\.q_quant'
                       r'.*grid \[-4, 3\] has no ONNX integer type'):
        run_lowered(Wrap(q), torch.randn(2, 4), str(tmp_path / 'q.onnx'))


def test_fp32_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match='FP32 model'):
        export_onnx(Wrap(nn.Linear(4, 4)), torch.randn(1, 4),
                    str(tmp_path / 'x.onnx'))
    assert not (tmp_path / 'x.onnx').exists()
