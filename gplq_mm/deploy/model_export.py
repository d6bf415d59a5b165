"""Export a W4A4 config + checkpoint to ONNX (what ``tools/export_onnx.py``
runs): build the model, choose the part that exports, trace it on real test
images, lower the ``gplq`` nodes, and optionally check the file in
onnxruntime against the PyTorch integer path.

What is exported (docs/deployment.md):

* classifiers (mmpretrain): the whole network up to the logits, i.e.
  ``model(inputs, mode='tensor')``;
* detectors (mmdet): backbone + neck, i.e. ``extract_feat(inputs)`` with one
  output per feature level.  The RPN and RoI heads (their quantized layers
  included) stay in PyTorch: RoIAlign and the proposal logic are mmcv ops
  that ONNX cannot express without mmdeploy's custom operators.

The input is the tensor *after* the model's ``data_preprocessor`` (mean/std,
BGR->RGB, padding): that stays outside the graph, as in mmdeploy.  Shapes are
static: the traced batch and image size.
"""
import copy
import json
import os.path as osp
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .onnx_export import ExportError, check_onnx, export_onnx


class Logits(nn.Module):
    """A classifier's logits (``mode='tensor'``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode='tensor')


class Features(nn.Module):
    """A detector's backbone + neck (``extract_feat``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.inner = getattr(model, 'model', model)  # GPLQModel wraps it

    def forward(self, x):
        return tuple(self.inner.extract_feat(x))


def load_model(config: str, checkpoint: str, trust: bool = False,
               cfg_options: Optional[dict] = None):
    """(cfg, model) as the stock test script builds them: the config's
    ``custom_imports`` imported, its ``data_preprocessor`` merged in, the
    checkpoint read safely (``trust`` allows pickled objects) and loaded
    strictly (GPLQModel's load hook names any mismatching key)."""
    from gplq_mm.engine.build import build_from_config
    from gplq_mm.engine.safe_checkpoint import load_checkpoint_file
    if not osp.isfile(config):
        raise ExportError(f'config {config!r} does not exist.')
    cfg, model = build_from_config(config, cfg_options)
    try:
        ckpt = load_checkpoint_file(checkpoint, trust=trust)
    except (FileNotFoundError, RuntimeError) as e:
        raise ExportError(str(e)) from None
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ExportError(f'{checkpoint} holds a {type(ckpt).__name__}, not '
                          'a checkpoint dict (state_dict, meta).')
    packed = [k for k in model.state_dict() if k.endswith('.weight_packed')]
    fp = [k for k in packed if k not in sd and
          k[:-len('_packed')] in sd]
    if fp:
        raise ExportError(
            f'{checkpoint} holds FP32 weights ({fp[0][:-len("_packed")]}) '
            f'where {config} expects INT4 codes ({fp[0]}): it is a stage-1 '
            '(W32A4) or FP32 checkpoint. Export the .pth that '
            'tools/gplq_quantize.py wrote together with this config.')
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f'{checkpoint} does not fit {config}: {str(e)[:1500]} (give the '
            'W4A4 config and checkpoint that tools/gplq_quantize.py wrote '
            'together).') from None
    model.eval()
    return cfg, model


def deploy_part(model: nn.Module, x: Optional[torch.Tensor] = None):
    """(module to export, output names, what) for a classifier or detector.

    A detector's outputs are its feature maps ``feat0 .. featN-1``; their
    number is counted by one forward on ``x`` (names None without ``x``).
    """
    inner = getattr(model, 'model', model)
    if hasattr(inner, 'neck') and hasattr(inner, 'rpn_head') or \
            hasattr(inner, 'roi_head') or hasattr(inner, 'bbox_head'):
        if not hasattr(inner, 'extract_feat'):
            raise ExportError(f'{type(inner).__name__}: a detector without '
                              'extract_feat cannot be exported.')
        module, names = Features(model), None
        if x is not None:
            with torch.no_grad():
                names = tuple(f'feat{i}' for i in range(len(module(x))))
        return module, names, 'detector backbone + neck'
    if hasattr(inner, 'head') and hasattr(inner, 'extract_feat'):
        return Logits(model), ('logits', ), 'classifier'
    raise ExportError(
        f'{type(inner).__name__} is neither an mmpretrain classifier (.head) '
        'nor an mmdet detector (.rpn_head/.roi_head/.bbox_head): there is no '
        'known part of it to export.')


def test_loader(cfg, batch_size: int):
    """The config's test split in order, ``batch_size`` images a batch, in
    this process (no workers)."""
    from mmengine.runner import Runner
    dl = copy.deepcopy(cfg.test_dataloader)
    dl.batch_size, dl.num_workers = batch_size, 0
    dl.pop('persistent_workers', None)
    dl.sampler = dict(type='DefaultSampler', shuffle=False)
    return Runner.build_dataloader(dl)


def example_batch(cfg, model, batch_size: int = 1,
                  shape: Optional[Sequence[int]] = None, seed: int = 0):
    """The export's example input: the first ``batch_size`` images of the
    config's test split through the data preprocessor, or, with ``shape``
    (H, W), a seeded standard-normal tensor of that size."""
    if shape is not None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, 3, *shape, generator=g)
    try:
        batch = next(iter(test_loader(cfg, batch_size)))
    except Exception as e:
        raise ExportError(
            f'could not read a test image through the config\'s '
            f'test_dataloader ({type(e).__name__}: {e}); give --shape H W '
            'to export on a random input instead.') from None
    with torch.no_grad():
        return model.data_preprocessor(batch, False)['inputs'].float()


def export_checkpoint(config: str, checkpoint: str, out: str,
                      batch_size: int = 1,
                      shape: Optional[Sequence[int]] = None,
                      check: bool = False, trust: bool = False,
                      cfg_options: Optional[dict] = None,
                      log: Callable[[str], None] = print) -> dict:
    """Write ``out`` (ONNX) and ``out``'s JSON report; returns the report."""
    if not out.endswith('.onnx'):
        raise ExportError(f'--out {out!r}: give a path ending in .onnx.')
    cfg, model = load_model(config, checkpoint, trust, cfg_options)
    x = example_batch(cfg, model, batch_size, shape)
    module, names, what = deploy_part(model, x)
    t0 = time.time()
    info = export_onnx(module, x, out, output_names=names)
    report = dict(config=config, checkpoint=checkpoint, onnx=out, part=what,
                  input_shape=list(x.shape), bytes=info.bytes,
                  int4_params=info.int4_params,
                  float_params=info.float_params,
                  int4_share=info.int4_share,
                  quantized_tensors=len(info.quantized_tensors),
                  export_seconds=time.time() - t0)
    log(f'{what}: {out} ({info.bytes / 2**20:.1f} MiB), input '
        f'{tuple(x.shape)}; {info.int4_params} weights in INT4 '
        f'({100 * info.int4_share:.1f}% of weight-like initializers), '
        f'{len(info.quantized_tensors)} quantized tensors')
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            path = osp.join(tmp, 'with_codes.onnx')
            export_onnx(module, x, path, with_codes=True, output_names=names)
            rep = check_onnx(module, path, x)
        report['check'] = asdict(rep)
        log(f'onnxruntime check: {rep.tensors} quantized tensors, '
            f'{rep.codes_differing} of {rep.codes} codes differ '
            f'({len(rep.worst)} tensors); outputs max rel diff '
            f'{rep.max_output_rel:.2e}' +
            (f'; first differing: {rep.first_differing}'
             if rep.first_differing else ''))
    with open(osp.splitext(out)[0] + '.json', 'w') as f:
        json.dump(report, f, indent=1)
    return report
