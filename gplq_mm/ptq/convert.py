"""W32A4 -> W4A4 model structure: integer layers and QwT compensation.

Two entry points share one structure, so a checkpoint written by stage 2
loads into a model built from the W4A4 config:

* :func:`convert_layer` / :func:`attach_qwt`: used by ``tools/gplq_quantize.py``
  on a calibrated W32A4 model (real weights).
* :func:`build_w4a4_structure`: used by ``GPLQModel(w4a4=...)`` when the stock
  test script builds the W4A4 config (empty buffers, filled by the checkpoint).
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from gplq_mm.quant import (IntQConv2d, IntQLinear, QConv2d, QLinear,
                           WeightQuantConfig, to_integer)

_QWT_CLASSES: Dict[type, type] = {}


def transformer_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The transformer blocks of a wrapped model, in forward order.

    mmdet/mmpretrain Swin: ``backbone.stages[i].blocks[j]``; mmpretrain ViT /
    DeiT: ``backbone.layers[i]``.  Names are relative to ``model``.
    """
    bb = getattr(model, 'backbone', None)
    out = []
    if bb is not None and hasattr(bb, 'stages'):
        for i, stage in enumerate(bb.stages):
            for j, blk in enumerate(getattr(stage, 'blocks', [])):
                out.append((f'backbone.stages.{i}.blocks.{j}', blk))
    elif bb is not None and hasattr(bb, 'layers'):
        for i, blk in enumerate(bb.layers):
            out.append((f'backbone.layers.{i}', blk))
    return out


class QwTMixin:
    """Block forward plus QwT compensation: ``y = block(x) + W_c x + b_c``."""

    def forward(self, x, *args, **kwargs):
        return super().forward(x, *args, **kwargs) + self.qwt(x)


def attach_qwt(block: nn.Module, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None,
               dim: Optional[int] = None) -> nn.Module:
    """Give ``block`` a compensation Linear ``qwt`` (class swap, in place)."""
    if weight is not None:
        dim_out, dim_in = weight.shape
    else:
        dim_out = dim_in = dim
    base = type(block)
    if not isinstance(block, QwTMixin):
        if base not in _QWT_CLASSES:
            _QWT_CLASSES[base] = type(f'QwT{base.__name__}', (QwTMixin, base),
                                      {})
        block.__class__ = _QWT_CLASSES[base]
    # FP32 compensation (QwT keeps it in float; its cost is listed in the report)
    lin = nn.Linear(dim_in, dim_out)
    with torch.no_grad():
        lin.weight.copy_(weight if weight is not None else torch.zeros(
            dim_out, dim_in))
        lin.bias.copy_(bias if bias is not None else torch.zeros(dim_out))
    dev = next(block.parameters()).device
    block.qwt = lin.to(dev)
    return block


def block_width(block: nn.Module) -> Optional[int]:
    """Channels of a block's input/output (its first LayerNorm), if any."""
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    return None


def convert_layer(model: nn.Module, name: str, w_cfg: WeightQuantConfig,
                  use_learned_scale: bool = False,
                  hessian: Optional[torch.Tensor] = None) -> nn.Module:
    """Replace the QLinear/QConv2d ``name`` of ``model`` by its integer form
    (``hessian``: GPTQ rounding, :func:`gplq_mm.quant.to_integer`)."""
    mod = model.get_submodule(name)
    new = to_integer(mod, w_cfg, name, use_learned_scale=use_learned_scale,
                     hessian=hessian)
    model.set_submodule(name, new)
    return new


def float_layers(model: nn.Module, within: str = '') -> List[str]:
    """Names of the QLinear/QConv2d modules (optionally under ``within``)."""
    prefix = within + '.' if within else ''
    return [prefix + n if n else within
            for n, m in (model.get_submodule(within) if within else
                         model).named_modules()
            if isinstance(m, (QLinear, QConv2d))]


def integer_fold(model: nn.Module) -> str:
    """The ``fold`` of a converted model's integer layers (``pow2`` if they
    shift the activation codes, else ``full``): what ``w4a4.fold`` must say
    for :func:`build_w4a4_structure` to rebuild them."""
    return 'pow2' if any(getattr(m, 'input_shift', None) is not None
                         for m in model.modules()) else 'full'


def build_w4a4_structure(gplq_model: nn.Module, w_bits: int = 4,
                         qwt_blocks: Iterable[str] = (),
                         fold: str = 'full') -> None:
    """Turn a freshly built GPLQModel into the W4A4 structure (empty values).

    Every QLinear/QConv2d becomes IntQLinear/IntQConv2d with the same input
    quantizer (with per-input-channel code shifts if ``fold='pow2'``; W4A4
    configs written before the option have no ``fold`` and mean ``'full'``);
    each block named in ``qwt_blocks`` gets a zero compensation Linear.  The
    checkpoint written by stage 2 then fills every tensor.
    """
    if fold not in ('full', 'pow2'):
        raise ValueError(f'w4a4.fold={fold!r}: the W4A4 config must say '
                         '"pow2" or "full" (as written by gplq_quantize.py).')
    shift = fold == 'pow2'
    model = gplq_model.model
    for name in float_layers(model):
        mod = model.get_submodule(name)
        if isinstance(mod, QLinear):
            new = IntQLinear(mod.in_features, mod.out_features,
                             mod.bias is not None, mod.act_quant.cfg, w_bits,
                             name, shift=shift)
        else:
            new = IntQConv2d(mod, mod.act_quant.cfg, w_bits, name, shift=shift)
        model.set_submodule(name, new.to(mod.weight.device))
    blocks = dict(transformer_blocks(model))
    for name in qwt_blocks:
        if name not in blocks:
            raise ValueError(f'w4a4.qwt_blocks names {name!r}, which is not a '
                             'transformer block of this model; the W4A4 config '
                             'and the model architecture disagree.')
        dim = block_width(blocks[name])
        if dim is None:
            raise ValueError('cannot infer the width of '
                             f'{type(blocks[name]).__name__}')
        attach_qwt(blocks[name], dim=dim)
