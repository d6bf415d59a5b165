"""ONNX export of a W4A4 model: INT4 Q/DQ at opset 21, checked in onnxruntime.

:func:`export_onnx` traces the model with ``torch.onnx.export`` (the
TorchScript exporter).  The quantized modules export as ``gplq`` placeholder
nodes (:mod:`gplq_mm.quant.onnx_ops`), which :func:`lower_gplq_nodes`
rewrites into standard operators:

* activation quantizer (uniform): ``QuantizeLinear`` (INT4, UINT4 or INT8 by
  its grid; per tensor, per channel or per token via ``axis``) ->
  ``DequantizeLinear`` with the same scale;
* activation quantizer (log-sqrt2, after the softmax): elementwise ops,
  ``k = clip(round(-2 log2(x / s)), 0, top)`` corrected against PyTorch's
  own code thresholds, ``y = s * 2^(-k/2)`` (0 for ``k = top``) gathered
  from a table (:func:`_log2_nodes`);
* integer Linear / Conv2d: ``QuantizeLinear`` (the activation codes, INT4) ->
  ``DequantizeLinear`` with the per-input-channel ``2^e`` of the pow2 fold
  (exact: the shifted codes) -> ``MatMul`` / ``Conv`` with the weight codes
  as an INT4 initializer (behind a ``DequantizeLinear`` of scale 1: an
  integer GEMM, exact in float32) -> ``Mul`` by the per-output-channel
  weight scale ``d`` -> ``Add`` bias: the PyTorch integer path op for op;
* QwT compensation, LayerNorm, GELU, softmax and the rest: as traced (QwT is
  a float ``MatMul`` + ``Add``).

:func:`check_onnx` runs the file in onnxruntime with every ``QuantizeLinear``
(and log-sqrt2 code) exposed as an extra INT8 output, and compares those
codes and the final outputs with the PyTorch integer model.
"""
import functools
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from gplq_mm.quant import (IntQConv2d, IntQLinear, QConv2d, QLinear,
                           iter_act_quantizers)
from gplq_mm.quant import functional as QF
from gplq_mm.quant.onnx_ops import DOMAIN

OPSET = 21
#: opset-21 tensor types for activation grids, by (qmin, qmax)
_GRIDS = {(-8, 7): 'INT4', (0, 15): 'UINT4', (-128, 127): 'INT8',
          (0, 255): 'UINT8'}
CODES_PREFIX = 'codes::'


class ExportError(ValueError):
    """The model cannot be exported; the message names module and reason."""


@dataclass
class ExportInfo:
    path: str
    bytes: int
    #: weights stored as INT4 initializers / all weight-like initializers
    int4_params: int = 0
    float_params: int = 0
    #: quantized tensors (one per QuantizeLinear or log-sqrt2 quantizer)
    quantized_tensors: List[str] = field(default_factory=list)

    @property
    def int4_share(self) -> float:
        total = self.int4_params + self.float_params
        return self.int4_params / total if total else 0.0


def check_exportable(model: nn.Module) -> None:
    """A W4A4 model (stage-2 output) or ExportError naming what it is."""
    ints = [n for n, m in model.named_modules()
            if isinstance(m, (IntQLinear, IntQConv2d))]
    fakes = [n for n, m in model.named_modules()
             if isinstance(m, (QLinear, QConv2d))]
    if not ints:
        what = ('a W32A4 (stage-1) model: its weights are still FP32'
                if fakes else 'an FP32 model: it has no integer layers')
        raise ExportError(
            f'{what}. Export the W4A4 config and checkpoint written by '
            'tools/gplq_quantize.py (stage 2).')
    if fakes:
        raise ExportError(
            f'{fakes[0]} is a fake-quantized layer with FP32 weights in a W4A4 '
            'model; every quantized layer must be integer (stage 2 converts '
            'them all).')
    for name, q in iter_act_quantizers(model):
        if not bool(q.initialized):
            raise ExportError(f'{name}: activation quantizer without a '
                              'calibrated scale.')


def export_onnx(module: nn.Module, example: torch.Tensor, path: str,
                with_codes: bool = False,
                output_names: Tuple[str, ...] = ('output', ),
                require_w4a4: bool = True) -> ExportInfo:
    """Export ``module`` (called as ``module(example)``) to ``path``.

    ``with_codes``: also output every quantized tensor's integer codes (INT8
    graph outputs named ``codes::<node>``), for :func:`check_onnx`.
    ``require_w4a4=False`` lets an FP32 model through (the baseline of
    ``tools/benchmark_onnx.py``).
    """
    import onnx
    if require_w4a4:
        check_exportable(module)
    module.eval()
    buf = io.BytesIO()
    # TracerWarnings: the modules' Python-side checks (calibrated?, shapes,
    # grids) are evaluated once and baked in: expected for a static export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                module, (example, ), buf, opset_version=OPSET, dynamo=False,
                input_names=['inputs'], output_names=list(output_names),
                custom_opsets={DOMAIN: 1}, do_constant_folding=True)
        except Exception as e:  # the exporter's own message names the op
            raise ExportError(f'torch.onnx.export failed: {e}') from e
    proto = onnx.load_from_string(buf.getvalue())
    info = lower_gplq_nodes(proto, with_codes)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    with open(path, 'wb') as f:
        f.write(data)
    info.path, info.bytes = path, len(data)
    return info


# ---------------------------------------------------------------------------
# rewriting the gplq nodes
# ---------------------------------------------------------------------------
class _Graph:
    """Constant lookup and fresh names over one ONNX graph."""

    def __init__(self, proto):
        from onnx import numpy_helper
        self.g = proto.graph
        self.consts: Dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in self.g.initializer}
        for n in self.g.node:
            if n.op_type == 'Constant' and n.domain in ('', 'ai.onnx'):
                for a in n.attribute:
                    if a.name == 'value':
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        self.new_inits = []
        self.count = 0

    def const(self, name: str, what: str, node) -> np.ndarray:
        if name not in self.consts:
            raise ExportError(f'{node.name}: its {what} is not a constant of '
                              'the graph (computed at run time?).')
        return self.consts[name]

    def fresh(self, base: str) -> str:
        self.count += 1
        return f'{base}__{self.count}'

    def init(self, base: str, arr: np.ndarray, dtype: Optional[str] = None):
        from onnx import TensorProto, helper, numpy_helper
        name = self.fresh(base)
        if dtype in ('INT4', 'UINT4'):
            t = helper.make_tensor(name, getattr(TensorProto, dtype),
                                   list(arr.shape),
                                   arr.astype(np.int64).reshape(-1).tolist())
        else:
            t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.new_inits.append(t)
        return name


def _attrs(node) -> dict:
    from onnx import helper
    out = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v
            for k, v in out.items()}


def _grid(qmin: int, qmax: int, name: str) -> str:
    dtype = _GRIDS.get((qmin, qmax))
    if dtype is None:
        raise ExportError(f'{name}: the grid [{qmin}, {qmax}] has no ONNX '
                          'integer type (INT4, UINT4, INT8, UINT8 only), so '
                          'QuantizeLinear cannot express it.')
    return dtype


def _zero_point(gr: _Graph, dtype: str, shape, base: str) -> str:
    np_dt = {'INT8': np.int8, 'UINT8': np.uint8}.get(dtype, np.int64)
    return gr.init(base + '.zp', np.zeros(shape, dtype=np_dt), dtype)


def _qdq_nodes(gr: _Graph, node, out: List, codes: List) -> None:
    from onnx import TensorProto, helper
    a = _attrs(node)
    x, y = node.input[0], node.output[0]
    scale = gr.const(node.input[1], 'scale', node).astype(np.float32)
    base = a.get('name') or node.name or gr.fresh('qdq')
    if a['kind'] == 'log2':
        _log2_nodes(gr, x, y, scale, a['bits'], base, out, codes)
        return
    dtype = _grid(a['qmin'], a['qmax'], base)
    axis = a['axis']
    kw = {} if axis < 0 else {'axis': axis}
    s = gr.init(f'{base}.scale', scale)
    zp = _zero_point(gr, dtype, scale.shape, base)
    q = gr.fresh(f'{base}.codes')
    out += [helper.make_node('QuantizeLinear', [x, s, zp], [q], **kw),
            helper.make_node('DequantizeLinear', [q, s, zp], [y], **kw)]
    codes.append((base, q, 'int'))


@functools.lru_cache(maxsize=None)
def log2_thresholds(bits: int) -> np.ndarray:
    """``b[j]``, j < 2^bits - 1: the smallest float32 ratio ``r = x / s``
    that PyTorch's log-sqrt2 quantizer maps to a code ``<= j``.

    Found with PyTorch's own function (:func:`QF.log2_quantize`) on every
    float32 within 4096 ulps of ``2^(-(j + 1/2)/2)``; the code is checked
    to step down exactly once there.  ``k(r) = #{j : r < b[j]}`` then
    reproduces PyTorch's codes without depending on how a runtime rounds
    its logarithm."""
    top = 2**bits - 1
    out = np.empty(top, dtype=np.float32)
    one = torch.ones((), dtype=torch.float32)
    for j in range(top):
        c = np.array([2.0**(-(j + 0.5) / 2)], dtype=np.float32).view(np.int32)
        r = torch.from_numpy((c[0] + np.arange(-4096, 4096, dtype=np.int32))
                             .view(np.float32))
        le = QF.log2_quantize(r, one, bits) <= j
        first = int(le.to(torch.uint8).argmax())
        if not (bool(le[first:].all()) and not bool(le[:first].any())):
            raise ExportError(f'log-sqrt2 codes of {bits} bits are not '
                              f'monotone near level {j}; cannot export.')
        out[j] = float(r[first])
    return out


def _log2_nodes(gr: _Graph, x: str, y: str, scale: np.ndarray, bits: int,
                base: str, out: List, codes: List) -> None:
    """The log-sqrt2 quantizer, code for code as in PyTorch.

    ``k0 = clip(round(-2 log(r) / log 2), 0, top)`` with ``r = x / s`` is
    within one step of PyTorch's code (its logarithm is another
    implementation); one comparison with the thresholds on each side
    (:func:`log2_thresholds`, gathered at ``k0``) makes it exact.  The value
    ``s * 2^(-k/2)`` (0 for ``k = top``) is gathered from a table that
    PyTorch computed, so it is the same float too."""
    from onnx import TensorProto, helper
    if scale.size != 1:
        raise ExportError(f'{base}: a log-sqrt2 quantizer with '
                          f'{scale.size} scales; only a per-tensor scale '
                          'exports.')
    top = 2**bits - 1
    b = log2_thresholds(bits)
    s32 = torch.tensor(float(scale.reshape(())), dtype=torch.float32)
    levels = torch.arange(top + 1, dtype=torch.float32)
    val = (QF._exp2(levels.mul(-0.5)) * s32).numpy()
    val[top] = 0.0
    hi = np.append(b, np.float32(0.0))           # r < hi[k0]: one code up
    lo = np.insert(b, 0, np.float32(np.inf))     # r >= lo[k0]: one code down
    c = {k: gr.init(f'{base}.{k}', np.asarray(v, dtype=np.float32))
         for k, v in (('scale', scale.reshape(())), ('tiny', 1e-30),
                      ('m2_ln2', -2.0 / math.log(2.0)), ('zero', 0.0),
                      ('top', float(top)), ('hi', hi), ('lo', lo),
                      ('values', val))}
    t = [gr.fresh(f'{base}.t') for _ in range(14)]
    out += [
        helper.make_node('Div', [x, c['scale']], [t[0]]),           # r
        helper.make_node('Max', [t[0], c['tiny']], [t[1]]),
        helper.make_node('Log', [t[1]], [t[2]]),
        helper.make_node('Mul', [t[2], c['m2_ln2']], [t[3]]),
        helper.make_node('Round', [t[3]], [t[4]]),
        helper.make_node('Clip', [t[4], c['zero'], c['top']], [t[5]]),  # k0
        helper.make_node('Cast', [t[5]], [t[6]], to=TensorProto.INT64),
        helper.make_node('Gather', [c['hi'], t[6]], [t[7]]),
        helper.make_node('Gather', [c['lo'], t[6]], [t[8]]),
        helper.make_node('Less', [t[0], t[7]], [t[9]]),
        helper.make_node('GreaterOrEqual', [t[0], t[8]], [t[10]]),
        helper.make_node('Cast', [t[9]], [t[11]], to=TensorProto.FLOAT),
        helper.make_node('Cast', [t[10]], [t[12]], to=TensorProto.FLOAT),
        helper.make_node('Sub', [t[5], t[12]], [t[13]]),
    ]
    k1, k, ki = (gr.fresh(f'{base}.{n}') for n in ('k1', 'k', 'ki'))
    out += [helper.make_node('Add', [t[13], t[11]], [k1]),
            helper.make_node('Clip', [k1, c['zero'], c['top']], [k]),  # codes
            helper.make_node('Cast', [k], [ki], to=TensorProto.INT64),
            helper.make_node('Gather', [c['values'], ki], [y])]
    codes.append((base, k, 'float'))


def _int_layer_nodes(gr: _Graph, node, out: List, codes: List,
                     conv: bool) -> None:
    from onnx import helper
    a = _attrs(node)
    x, y = node.input[0], node.output[0]
    base = a.get('name') or node.name or gr.fresh('int')
    s = gr.const(node.input[1], 'activation scale', node).astype(np.float32)
    mult = gr.const(node.input[2], 'input shift', node).astype(np.float32)
    wc = gr.const(node.input[3], 'weight codes', node)
    d = gr.const(node.input[4], 'weight scale', node).astype(np.float32)
    b = gr.const(node.input[5], 'bias', node).astype(np.float32)
    dtype = _grid(a['qmin'], a['qmax'], base)
    if wc.min() < -8 or wc.max() > 7:
        raise ExportError(f'{base}: weight codes outside [-8, 7] (a '
                          f'{int(np.abs(wc).max()).bit_length() + 1}-bit '
                          'weight?); only 4-bit weights export as INT4.')
    rank_axis = {}
    if s.ndim:
        rank_axis = {'axis': 1} if conv else {'axis': -1}
    sn = gr.init(f'{base}.act_scale', s)
    zp = _zero_point(gr, dtype, s.shape, f'{base}.act')
    q = gr.fresh(f'{base}.codes')
    xs = gr.fresh(f'{base}.shifted')
    mn = gr.init(f'{base}.shift', mult)
    zpm = _zero_point(gr, dtype, mult.shape, f'{base}.shift')
    m_axis = ({'axis': 1} if conv else {'axis': -1}) if mult.ndim else {}
    out += [helper.make_node('QuantizeLinear', [x, sn, zp], [q], **rank_axis),
            # codes << e, exactly: DequantizeLinear by 2^e
            helper.make_node('DequantizeLinear', [q, mn, zpm], [xs],
                             **m_axis)]
    codes.append((base, q, 'int'))
    # The weight is its INT4 codes behind a DequantizeLinear of scale 1: the
    # GEMM then sums integers, exact in float32 (|sum| < 2^24) whatever the
    # kernel's order, and the per-output-channel d follows as a Mul, as in
    # the PyTorch integer path.  (d inside the DequantizeLinear would make
    # the GEMM a float one: correct to ~1e-6, but not code-for-code.)
    wq, acc, sc = (gr.fresh(f'{base}.{k}') for k in ('weight', 'acc', 'scaled'))
    one = gr.init(f'{base}.weight_one', np.array(1.0, dtype=np.float32))
    zw = _zero_point(gr, 'INT4', (), f'{base}.weight')
    cshape = (1, -1, 1, 1) if conv else (-1, )
    dn = gr.init(f'{base}.weight_scale', d.reshape(cshape))
    bn = gr.init(f'{base}.bias', b.reshape(cshape))
    if conv:
        wn = gr.init(f'{base}.weight_codes', wc.astype(np.int64), 'INT4')
        out += [helper.make_node('DequantizeLinear', [wn, one, zw], [wq]),
                helper.make_node('Conv', [xs, wq], [acc],
                                 strides=a['strides'], pads=a['pads'],
                                 dilations=a['dilations'], group=a['group'])]
    else:  # B = Wc^T, [in, out]
        wn = gr.init(f'{base}.weight_codes', wc.T.astype(np.int64), 'INT4')
        out += [helper.make_node('DequantizeLinear', [wn, one, zw], [wq]),
                helper.make_node('MatMul', [xs, wq], [acc])]
    out += [helper.make_node('Mul', [acc, dn], [sc]),
            helper.make_node('Add', [sc, bn], [y])]


def lower_gplq_nodes(proto, with_codes: bool = False) -> ExportInfo:
    """Rewrite the ``gplq`` nodes of ``proto`` (in place) into opset 21."""
    from onnx import TensorProto, helper
    gr = _Graph(proto)
    nodes, codes = [], []
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
        elif node.op_type == 'QDQ':
            _qdq_nodes(gr, node, nodes, codes)
        elif node.op_type in ('IntLinear', 'IntConv'):
            _int_layer_nodes(gr, node, nodes, codes,
                             conv=node.op_type == 'IntConv')
        else:
            raise ExportError(f'{node.name}: unknown {DOMAIN} op '
                              f'{node.op_type}.')
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(gr.new_inits)
    _drop_unused(proto)
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid('', OPSET)])
    if with_codes:  # INT8 copies of the codes as extra outputs (shaped)
        import onnx
        shapes = {v.name: v.type.tensor_type.shape for v in
                  onnx.shape_inference.infer_shapes(proto).graph.value_info}
        for base, name, kind in codes:
            out = CODES_PREFIX + base
            proto.graph.node.append(helper.make_node(
                'Cast', [name], [out], to=TensorProto.INT8))
            vi = helper.make_tensor_value_info(out, TensorProto.INT8, [])
            vi.type.tensor_type.shape.CopyFrom(shapes[name])
            proto.graph.output.append(vi)
    info = ExportInfo(path='', bytes=0,
                      quantized_tensors=[b for b, _, _ in codes])
    for t in proto.graph.initializer:  # weight-like: 2-D and more
        if len(t.dims) < 2:  # (scales, zero points, biases)
            continue
        n = int(np.prod(t.dims))
        if t.data_type == TensorProto.INT4:  # integer-layer weights
            info.int4_params += n
        else:  # QwT, position embedding, class token ...
            info.float_params += n
    return info


def _drop_unused(proto) -> None:
    used = {i for n in proto.graph.node for i in n.input}
    used |= {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    nodes = [n for n in proto.graph.node
             if not (n.op_type == 'Constant' and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


# ---------------------------------------------------------------------------
# the check against PyTorch
# ---------------------------------------------------------------------------
def torch_codes(module: nn.Module, example: torch.Tensor):
    """(outputs, {quantizer name: codes}) of ``module(example)`` in PyTorch:
    the integer layers' activation codes and every activation quantizer's
    codes (uniform grid, or log-sqrt2 exponents), keyed like the export's
    ``codes::<name>`` outputs."""
    from gplq_mm.models import attention
    store = {}
    hooks = []

    def hook(q):
        def fn(mod, args, out):
            x = args[0]
            if q.cfg.kind == 'log2':
                c = QF.log2_quantize(x, q.effective_scale(x.ndim), q.cfg.bits)
            else:
                c = q.codes(x)
            store[q.name] = c.detach()
        return fn

    for name, m in module.named_modules():
        if isinstance(m, (IntQLinear, IntQConv2d)):
            hooks.append(m.register_forward_hook(hook(m.act_quant)))
    for name, q in iter_act_quantizers(module):
        hooks.append(q.register_forward_hook(hook(q)))
    fused = attention.FUSED_ATTENTION
    attention.FUSED_ATTENTION = False  # the op-by-op forward calls them
    try:
        with torch.no_grad():
            out = module(example)
    finally:
        attention.FUSED_ATTENTION = fused
        for h in hooks:
            h.remove()
    return out, store


@dataclass
class CheckReport:
    tensors: int = 0
    codes: int = 0
    codes_differing: int = 0
    max_output_rel: float = 0.0
    #: (tensor, codes differing), most first
    worst: List[Tuple[str, int]] = field(default_factory=list)
    #: the first tensor, in graph order, whose codes differ (where a
    #: difference starts; later ones may be its consequences)
    first_differing: str = ''
    unmatched: List[str] = field(default_factory=list)


def ort_session(path: str, threads: int = 1, optimization: str = 'basic',
                nbits_accuracy: int = 0):
    """An onnxruntime CPU session.

    ``optimization``: onnxruntime's graph optimization level ('disable',
    'basic', 'extended', 'all').  From 'extended' on, onnxruntime fuses
    ``DequantizeLinear(INT4) -> MatMul`` into its ``MatMulNBits`` kernel.
    ``nbits_accuracy`` is that kernel's ``accuracy_level``: 0 (default)
    computes in float32 and, on our integer-valued GEMMs, gives the same
    results as the unfused graph; 4 quantizes the activations to int8
    inside the kernel (faster, and no longer our model: measured ~7e-2
    absolute error on one 384x1536 layer).
    """
    import onnxruntime as ort
    levels = {'disable': ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f'optimization={optimization!r}: choose one of '
                         f'{sorted(levels)}.')
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = levels[optimization]
    opts.add_session_config_entry('session.qdq_matmulnbits_accuracy_level',
                                  str(nbits_accuracy))
    return ort.InferenceSession(path, opts,
                                providers=['CPUExecutionProvider'])


def check_onnx(module: nn.Module, path_with_codes: str,
               example: torch.Tensor, threads: int = 1,
               optimization: str = 'all') -> CheckReport:
    """Run the ``with_codes`` export in onnxruntime and compare with PyTorch."""
    sess = ort_session(path_with_codes, threads, optimization)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {
        sess.get_inputs()[0].name: example.cpu().numpy()})))
    out, store = torch_codes(module, example)
    outs = out if isinstance(out, (list, tuple)) else [out]
    rep = CheckReport()
    plain = [n for n in names if not n.startswith(CODES_PREFIX)]
    for n, t in zip(plain, outs):
        ref = t.detach().cpu().numpy()
        rel = float(np.abs(res[n] - ref).max() /
                    max(float(np.abs(ref).max()), 1e-12))
        rep.max_output_rel = max(rep.max_output_rel, rel)
    for n in names:
        if not n.startswith(CODES_PREFIX):
            continue
        key = n[len(CODES_PREFIX):]
        if key not in store:
            rep.unmatched.append(n)
            continue
        ref = store[key].cpu().numpy().astype(np.int64)
        got = res[n].astype(np.int64)
        diff = int((ref != got).sum()) if ref.shape == got.shape else ref.size
        rep.tensors += 1
        rep.codes += ref.size
        rep.codes_differing += diff
        if diff:
            rep.worst.append((key, diff))
            rep.first_differing = rep.first_differing or key
    rep.worst.sort(key=lambda t: -t[1])
    return rep
