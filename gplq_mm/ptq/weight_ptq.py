"""Stage 2: weight PTQ with QwT compensation on a calibrated W32A4 model.

Order (what the paper and DESIGN.md sections 1/4 ask for):

1. activation quantizers frozen (scales from stage 1, or from PTQ calibration
   for the RepQ-ViT-style baseline);
2. every Linear/Conv2d *outside* the transformer blocks (patch embedding,
   patch merging, neck, heads) is converted to its integer form: activation
   scale folded into the weight, per-output-channel 4-bit codes with a
   searched clipping range;
3. transformer blocks in forward order: the block input X is produced by the
   already quantized and compensated model; the block is run with FP32
   weights (Y_fp) and with integer weights (Y_q), both on A4 inputs; the
   running float64 sums of QwT (X^T X, X^T (Y_fp - Y_q)) are accumulated
   batch by batch, the compensation is solved in closed form and kept only if
   it reduces the error on held-out batches.
"""
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from gplq_mm.quant import (IntQConv2d, IntQLinear, QState, QwTSums,
                           WeightQuantConfig, fit_qwt)
from .convert import (attach_qwt, convert_layer, float_layers,
                      transformer_blocks)


class _Stop(Exception):
    """Raised by a forward pre-hook to end a forward at a block's input."""


@dataclass
class LayerReport:
    name: str
    shape: List[int]
    rel_error: float  # ||W_eff - W|| / ||W|| of the integer layer


@dataclass
class BlockReport:
    name: str
    kept: bool
    r2: float
    err_before: float
    err_after: float
    rows: int
    exact: bool


@dataclass
class PTQReport:
    layers: List[LayerReport] = field(default_factory=list)
    blocks: List[BlockReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = ['per-layer weight quantization error (||W_q - W|| / ||W||):']
        for r in self.layers:
            lines.append(f'  {r.name:<60} {str(r.shape):<18} {r.rel_error:.4f}')
        if self.blocks:
            lines.append('per-block QwT (held-out squared error of the block '
                         'output, before -> after):')
            for b in self.blocks:
                lines.append(
                    f'  {b.name:<40} {"kept" if b.kept else "skipped":<8}'
                    f' R2={b.r2:+.3f}  {b.err_before:.4g} -> {b.err_after:.4g}'
                    f'{"" if b.exact else "  (lstsq fallback)"}')
        return '\n'.join(lines)


def _rel_error(layer: nn.Module, weight: torch.Tensor) -> float:
    w_eff = layer.dequantized_weight()
    return float((w_eff - weight.detach()).norm() /
                 weight.detach().norm().clamp_min(1e-12))


def convert_outside_blocks(model: nn.Module, w_cfg: WeightQuantConfig,
                           report: PTQReport,
                           use_learned_scale: bool = False) -> None:
    block_names = [n for n, _ in transformer_blocks(model)]
    for name in float_layers(model):
        if any(name.startswith(b + '.') for b in block_names):
            continue
        w = model.get_submodule(name).weight
        new = convert_layer(model, name, w_cfg, use_learned_scale)
        report.layers.append(LayerReport(name, list(w.shape),
                                         _rel_error(new, w)))


def _block_inputs(model: nn.Module, block: nn.Module,
                  run: Callable[[object], None], batch):
    """Run ``run(batch)`` up to ``block``; return its (args, kwargs)."""
    got = {}

    def pre_hook(mod, args, kwargs):
        got['args'], got['kwargs'] = args, kwargs
        raise _Stop

    h = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run(batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if 'args' not in got:
        raise RuntimeError('a calibration forward never reached the block; '
                           'is it used by the model?')
    return got['args'], got['kwargs']


@torch.no_grad()
def weight_ptq(model: nn.Module,
               batches: Callable[[], Iterable],
               run: Callable[[object], None],
               w_cfg: WeightQuantConfig,
               qwt: bool = True,
               lam: float = 1e-2,
               use_learned_scale: bool = False,
               logger: Optional[Callable[[str], None]] = None) -> PTQReport:
    """Quantize the weights of a calibrated W32A4 ``model`` in place.

    Args:
        model: The wrapped detector/classifier (``GPLQModel.model``) with
            calibrated activation quantizers.
        batches: Returns a fresh iterable of calibration batches (called once
            per block: memory stays flat in the number of images).
        run: Runs the model (at least its backbone) on one batch.
        w_cfg: Weight quantization config (bits, clipping search).
        qwt: Fit QwT compensation per transformer block.
        lam: Ridge lambda of QwT (the bias is not regularised).
        use_learned_scale: Use learned weight scales (direct-QAT baseline).
        logger: Progress messages.
    """
    log = logger or (lambda msg: None)
    t0 = time.time()
    report = PTQReport()
    for m in model.modules():
        if hasattr(m, 'set_state') and hasattr(m, 'observer'):
            m.set_state(QState.FROZEN)
    model.eval()
    convert_outside_blocks(model, w_cfg, report, use_learned_scale)
    log(f'converted {len(report.layers)} layers outside transformer blocks')
    blocks = transformer_blocks(model)
    for bi, (bname, block) in enumerate(blocks):
        fp_block = copy.deepcopy(block) if qwt else None
        for name in float_layers(model, bname):
            w = model.get_submodule(name).weight
            new = convert_layer(model, name, w_cfg, use_learned_scale)
            report.layers.append(LayerReport(name, list(w.shape),
                                             _rel_error(new, w)))
        if not qwt:
            continue
        sums = None
        for i, batch in enumerate(batches()):
            args, kwargs = _block_inputs(model, block, run, batch)
            x = args[0]
            y_fp = fp_block(*args, **kwargs)
            y_q = block(*args, **kwargs)
            if sums is None:
                c_in, c_out = x.shape[-1], y_q.shape[-1]
                sums = (QwTSums(c_in, c_out), QwTSums(c_in, c_out))
            sums[i % 2].update(x, y_fp - y_q)  # alternate: fit / held out
        for s in sums:
            s.all_reduce()
        fit = fit_qwt(sums[0], sums[1], lam)
        if fit.kept:
            attach_qwt(block, fit.weight, fit.bias)
        report.blocks.append(BlockReport(bname, fit.kept, fit.r2,
                                         fit.err_before, fit.err_after, fit.n,
                                         fit.exact))
        log(f'QwT block {bi + 1}/{len(blocks)} {bname}: '
            f'{"kept" if fit.kept else "skipped"}, held-out R2={fit.r2:+.3f}')
        del fp_block
    remaining = float_layers(model)
    if remaining:
        raise RuntimeError(f'layers left unconverted: {remaining[:5]}')
    report.seconds = time.time() - t0
    return report


def integer_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (IntQLinear, IntQConv2d))}
