"""The RepQ-ViT baseline, as the public code does it (zkkli/RepQ-ViT,
Li et al., ICCV 2023: ``classification/test_quant.py``,
``detection/tools/test.py`` and ``quant/quantizer.py``).

``tools/gplq_quantize.py --method repqvit`` runs it on an FP32 checkpoint:

1. Every Linear/Conv2d of the model is quantized: weights asymmetric per
   output channel; inputs asymmetric per tensor (the patch embedding at
   8 bits), except the layers right after a LayerNorm (q/k/v projection,
   fc1, patch-merging reduction), calibrated per channel; the attention's q,
   k, v per tensor and the post-softmax probabilities log-sqrt2.  Every range
   comes from RepQ-ViT's search (``observer='repq'``: exact quantiles at
   99.9/99.99/99.999 %, least squared error).
2. One forward of the whole calibration batch with everything quantized:
   each quantizer calibrates on the first tensor it sees, i.e. on the output
   of the quantized layers before it (``QState.SEQUENTIAL``).
3. Scale reparameterization (:func:`reparameterize`): each per-channel
   post-LayerNorm range becomes one per-tensor range (the mean scale and
   mean zero point); the per-channel ratio goes into the LayerNorm's affine
   and the next layer's weight and bias.
4. The weights, reparameterized, are quantized again.

The result is a simulated W4A4 model (fake quantization, weights stored as
their 4-bit values in float), evaluated by the stock ``tools/test.py`` like
RepQ-ViT evaluates its own; the asymmetric grids have no integer layer or
ONNX export here.  Differences from the public code, all documented in
docs/ablation.md: calibration images come from the training set (the public
code takes them from the validation loader); the log-sqrt2 grid maps its top
code (``2^-7.5`` times the scale) to zero, as our integer softmax grid does
(the public code keeps 16 levels plus zero, which 4 bits cannot encode).
"""
from typing import Callable, List, Tuple

import torch
from torch import nn

from gplq_mm.quant import QConv2d, QLinear, QState, QuantConfig, set_act_state
from gplq_mm.quant import functional as QF
from gplq_mm.quant.observers import RepQObserver
from gplq_mm.quant.quantizer import ActQuantizer, iter_act_quantizers

REPQVIT_A_BITS = 4  # the paper's W4A4 setting (its --a_bits default)


class RepQViTError(ValueError):
    """The model does not fit the RepQ-ViT procedure (message names why)."""


# The inputs RepQ-ViT calibrates per channel ('qkv', 'fc1', 'reduction' in
# its module names), in mmdet/mmpretrain names.
POST_NORM = r'(\.qkv|\.ffn\.layers\.0\.0|\.downsample\.reduction)$'


def repqvit_quant(a_bits: int = 4, per_channel: bool = True) -> dict:
    """``GPLQModel(quant=...)`` of the RepQ-ViT baseline.

    ``per_channel``: the calibration placement (post-LayerNorm inputs per
    channel); ``False``: the placement after the reparameterization (all
    per tensor), which the written config evaluates.
    """
    act = dict(bits=a_bits, granularity='per_tensor', signed=False,
               zero_point=True, observer='repq', learnable=False)
    return dict(
        scope='whole', act=act, first_layer_bits=8, qkv=dict(act),
        softmax=dict(bits=a_bits, granularity='per_tensor', signed=False,
                     kind='log2', observer='repq', learnable=False),
        weight=None,
        # the FP32 model loads without them; the reparameterized one has one
        add_bias=() if per_channel else (r'\.downsample\.reduction$', ),
        act_overrides={POST_NORM: dict(granularity='per_channel')}
        if per_channel else {})


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """RepQ-ViT's weight quantizer: asymmetric per output channel (axis 0),
    the range searched per channel; returns the dequantized weight."""
    obs = RepQObserver(weight.shape[0], 0, bits, 'uniform', 'weight')
    obs.update(weight)
    lo, hi = obs.bounds()
    s, z = QF.affine_qparams(lo, hi, 2**bits - 1)
    return QF.fake_quantize_affine(
        weight.detach().float(), QF.scale_view(s, weight.ndim, 0),
        QF.scale_view(z, weight.ndim, 0), 2**bits - 1).to(weight.dtype)


def post_norm_pairs(model: nn.Module) -> List[Tuple[str, nn.LayerNorm, str,
                                                    nn.Module]]:
    """``(norm name, norm, layer name, layer)``: each LayerNorm whose output
    is the input of exactly this Linear (mmpretrain ViT layers: ln1 -> qkv,
    ln2 -> fc1; Swin blocks of mmdet and mmpretrain: norm1 -> qkv, norm2 ->
    fc1; patch merging: norm -> reduction)."""
    pairs = []
    for name, m in model.named_modules():
        pre = f'{name}.' if name else ''
        attn = getattr(m, 'attn', None)
        if hasattr(m, 'ln1') and hasattr(m, 'ffn') and hasattr(attn, 'qkv'):
            pairs += [(pre + 'ln1', m.ln1, pre + 'attn.qkv', attn.qkv),
                      (pre + 'ln2', m.ln2, pre + 'ffn.layers.0.0',
                       m.ffn.layers[0][0])]
        elif hasattr(m, 'norm1') and hasattr(m, 'ffn') and \
                hasattr(attn, 'w_msa'):
            pairs += [(pre + 'norm1', m.norm1, pre + 'attn.w_msa.qkv',
                       attn.w_msa.qkv),
                      (pre + 'norm2', m.norm2, pre + 'ffn.layers.0.0',
                       m.ffn.layers[0][0])]
        elif hasattr(m, 'reduction') and getattr(m, 'norm', None) is not None:
            pairs.append((pre + 'norm', m.norm, pre + 'reduction',
                          m.reduction))
    return pairs


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, layer: nn.Module, name: str) -> None:
    """RepQ-ViT's scale reparameterization of one LayerNorm -> Linear pair,
    line by line as the public code: the per-channel input range of
    ``layer`` (scales ``d``, zero points ``z``) becomes the per-tensor one
    (mean ``d``, mean ``z``); ``r = d / mean(d)`` divides the LayerNorm's
    affine and multiplies the weight's input channels, the offset goes into
    the LayerNorm's bias and the layer's bias."""
    aq = layer.act_quant
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        raise RepQViTError(f'{name}: RepQ-ViT reparameterizes an affine '
                         f'LayerNorm before it, found {type(norm).__name__}.')
    if aq is None or aq.cfg.granularity != 'per_channel' or \
            not aq.cfg.zero_point or not bool(aq.initialized):
        raise RepQViTError(f'{name}: expected a calibrated per-channel '
                         'asymmetric input quantizer before the '
                         'reparameterization.')
    act_delta = aq.scale.detach().reshape(-1)
    act_zero_point = aq.zero_point.reshape(-1)
    act_min = -act_zero_point * act_delta
    target_delta = act_delta.mean()
    target_zero_point = act_zero_point.mean()
    target_min = -target_zero_point * target_delta
    r = act_delta / target_delta
    b = act_min / r - target_min
    norm.weight.data = norm.weight.data / r
    norm.bias.data = norm.bias.data / r - b
    layer.weight.data = layer.weight.data * r
    extra = torch.mm(layer.weight.data, b.reshape(-1, 1)).reshape(-1)
    if layer.bias is not None:
        layer.bias.data = layer.bias.data + extra
    else:
        layer.bias = nn.Parameter(extra)
    cfg = QuantConfig(**{**aq.cfg.to_dict(), 'granularity': 'per_tensor',
                         'axis': None})
    new = ActQuantizer(cfg, 1, aq.name).to(act_delta.device)
    new.scale.data.fill_(float(target_delta))
    new.zero_point.fill_(float(target_zero_point))
    new.initialized.fill_(True)
    new.set_state(QState.FROZEN)
    layer.act_quant = new


def _layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QLinear, QConv2d))]


@torch.no_grad()
def repqvit_ptq(model: nn.Module, forward: Callable[[], None], w_bits: int,
                log: Callable[[str], None] = print) -> dict:
    """Run RepQ-ViT on ``model`` (the detector/classifier inside
    ``GPLQModel``, injected with ``repqvit_quant(per_channel=True)`` and
    holding FP32 weights), in place.

    ``forward()`` runs the model once on the whole calibration batch.
    Returns counts for the report.
    """
    layers = _layers(model)
    if not layers:
        raise RepQViTError('the model has no quantized Linear/Conv2d.')
    fp32 = {n: m.weight.detach().clone() for n, m in layers}
    for n, m in layers:  # 1. the calibration forward sees W4 weights
        m.weight.data = quantize_weight(fp32[n], w_bits)
    set_act_state(model, QState.SEQUENTIAL)
    forward()  # 2. one batch; each quantizer calibrates on its first input
    missed = [n for n, q in iter_act_quantizers(model)
              if not bool(q.initialized)]
    if missed:
        raise RepQViTError(
            f'calibration: {len(missed)} quantizer(s) saw no input '
            f'in the calibration forward, e.g. {", ".join(missed[:3])}.')
    for n, m in layers:  # 3. reparameterize the FP32 weights
        m.weight.data = fp32[n]
    pairs = post_norm_pairs(model)
    for norm_name, norm, name, layer in pairs:
        reparameterize(norm, layer, name)
    left = [n for n, q in iter_act_quantizers(model)
            if q.cfg.granularity == 'per_channel']
    if left:
        raise RepQViTError(
            'no LayerNorm found before the per-channel input '
            f'quantizer(s) {", ".join(left[:3])}; the reparameterization '
            'knows mmpretrain ViT layers, Swin blocks and patch merging.')
    for n, m in layers:  # 4. quantize the reparameterized weights
        m.weight.data = quantize_weight(m.weight.data, w_bits)
    log(f'RepQ-ViT: {len(layers)} layers W{w_bits} (asymmetric per output '
        f'channel), {sum(1 for _ in iter_act_quantizers(model))} activation '
        f'quantizers calibrated in one sequential forward, {len(pairs)} '
        'LayerNorm->Linear pairs reparameterized to per-tensor inputs')
    return dict(layers=len(layers), reparameterized=len(pairs),
                act_quantizers=sum(1 for _ in iter_act_quantizers(model)))
