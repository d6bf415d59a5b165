"""tools/export_onnx.py on the micro W4A4 models, as a user runs it: the file
is standard opset 21 (INT4 Q/DQ, no custom op), and onnxruntime reproduces
the PyTorch integer model's codes at every quantized tensor."""
import json
import os.path as osp

import pytest
from gplq_test_utils import REPO, tail

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

TOOL = osp.join(REPO, 'tools', 'export_onnx.py')


def export(runs, cfg, ckpt, out, *extra):
    return runs([TOOL, cfg, ckpt, '--out', out, *extra], osp.dirname(out))


def act_quantizers(cfg, ckpt):
    """Quantized tensors of the PyTorch model: integer-layer inputs and the
    attention quantizers (q, k, v, softmax)."""
    from gplq_mm.deploy.model_export import load_model
    from gplq_mm.quant import iter_act_quantizers
    _, model = load_model(cfg, ckpt)
    return model, {n[len('model.'):] if n.startswith('model.') else n
                   for n, _ in iter_act_quantizers(model)}


def opset21_int4(path):
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain for o in m.opset_import} == {''}
    assert m.opset_import[0].version == 21
    ops = [n.op_type for n in m.graph.node]
    assert all(n.domain in ('', 'ai.onnx') for n in m.graph.node)
    int4 = [t for t in m.graph.initializer
            if t.data_type == onnx.TensorProto.INT4 and len(t.dims) >= 2]
    return m, ops, int4


@pytest.mark.slow
def test_classifier_export_matches_pytorch_codes(runs, cls_w4a4, tmp_path):
    out = str(tmp_path / 'deit.onnx')
    proc = export(runs, cls_w4a4.cfg, cls_w4a4.ckpt, out, '--check',
                  '--batch-size', 2)
    assert proc.returncode == 0, tail(proc)
    rep = json.load(open(str(tmp_path / 'deit.json')))
    model, names = act_quantizers(cls_w4a4.cfg, cls_w4a4.ckpt)
    chk = rep['check']
    # every quantized tensor of the model is checked, and none differs
    assert chk['tensors'] == rep['quantized_tensors'] == len(names)
    assert chk['unmatched'] == [] and chk['codes'] > 0
    assert chk['codes_differing'] == 0, chk['worst'][:5]
    assert chk['max_output_rel'] <= 1e-5
    assert rep['input_shape'][0] == 2
    m, ops, int4 = opset21_int4(out)
    assert 'QuantizeLinear' in ops and 'DequantizeLinear' in ops
    int_layers = [n for n, mod in model.named_modules()
                  if type(mod).__name__ in ('IntQLinear', 'IntQConv2d')]
    assert len(int4) == len(int_layers)
    # every weight of every integer layer is an INT4 initializer
    assert rep['int4_params'] == sum(
        mod.weight_codes().numel() for mod in model.modules()
        if type(mod).__name__ in ('IntQLinear', 'IntQConv2d'))
    # the activation Q/DQ are INT4 (UINT4 after the softmax is log-sqrt2:
    # elementwise ops, no QuantizeLinear)
    q_zp = {n.input[2] for n in m.graph.node if n.op_type == 'QuantizeLinear'}
    types = {t.data_type for t in m.graph.initializer if t.name in q_zp}
    assert types <= {onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                     onnx.TensorProto.INT8}
    assert onnx.TensorProto.INT4 in types
    assert 'Log' in ops  # the log-sqrt2 softmax quantizer
    assert 'onnxruntime check: ' in proc.stdout


@pytest.mark.slow
def test_detector_backbone_neck_export(runs, det_w4a4, tmp_path):
    out = str(tmp_path / 'det.onnx')
    proc = export(runs, det_w4a4.cfg, det_w4a4.ckpt, out, '--check')
    assert proc.returncode == 0, tail(proc)
    rep = json.load(open(str(tmp_path / 'det.json')))
    assert rep['part'] == 'detector backbone + neck'
    chk = rep['check']
    assert chk['codes_differing'] == 0, chk['worst'][:5]
    assert chk['max_output_rel'] <= 1e-5 and chk['unmatched'] == []
    m, ops, int4 = opset21_int4(out)
    outs = [o.name for o in m.graph.output]
    assert outs == [f'feat{i}' for i in range(len(outs))] and len(outs) >= 4
    # the heads stay in PyTorch: only backbone/neck quantizers are exported
    _, names = act_quantizers(det_w4a4.cfg, det_w4a4.ckpt)
    bn = {n for n in names if n.startswith(('backbone.', 'neck.'))}
    assert chk['tensors'] == len(bn) > 0


@pytest.mark.slow
@pytest.mark.parametrize('which,expected', [
    ('fp32', 'an FP32 model: it has no integer layers'),
    ('w32a4', 'a W32A4 (stage-1) model: its weights are still FP32'),
    ('mixed', 'it is a stage-1 (W32A4) or FP32 checkpoint'),
])
def test_not_a_w4a4_model(runs, arch, cls_w4a4, tmp_path, which, expected):
    a = arch['cls']
    cfg, ckpt = dict(fp32=(a.plain_cfg, a.fp32_ckpt),
                     w32a4=(a.stage1_cfg, a.w32a4_ckpt),
                     mixed=(cls_w4a4.cfg, a.w32a4_ckpt))[which]
    out = tmp_path / 'x.onnx'
    proc = export(runs, cfg, ckpt, str(out))
    assert proc.returncode != 0
    assert expected in proc.stderr, tail(proc)
    assert 'Traceback' not in proc.stderr
    assert not out.exists()  # nothing half-written
