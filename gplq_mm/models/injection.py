"""Quantizer injection: swap Linear/Conv2d/attention modules of a built model.

Known architectures (their module names are listed in docs/design.md §3):

* mmdet ``SwinTransformer`` (Mask R-CNN & co.),
* mmpretrain ``SwinTransformer``,
* mmpretrain ``VisionTransformer`` and subclasses (DeiT, distilled DeiT).

Every ``nn.Linear``/``nn.Conv2d`` in scope gets its input quantized (per input
channel by default); the patch-embedding input (the image) is quantized at
``first_layer_bits``; the attention matmul inputs q, k, v (per token) and the
post-softmax probabilities are quantized through a quantization-aware
attention forward.  ``scope='whole'`` covers backbone, neck and heads (the
RepQ-ViT detection protocol); ``scope='backbone'`` only the backbone.
Other models raise, unless ``generic=True`` (Linear/Conv2d inputs only).
"""
import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from gplq_mm.quant import (QConv2d, QLinear, QuantConfig, WeightQuantConfig)
from .attention import attention_classes, quantize_attention

SUPPORTED_BACKBONES = (
    'mmdet.models.backbones.swin.SwinTransformer',
    'mmpretrain.models.backbones.swin_transformer.SwinTransformer',
    'mmpretrain.models.backbones.vision_transformer.VisionTransformer '
    '(incl. DeiT, DistilledVisionTransformer)',
)


def _qcfg(value, default: QuantConfig, what: str) -> Optional[QuantConfig]:
    if value is None:
        return None
    if isinstance(value, QuantConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f'quant.{what} must be a dict of QuantConfig fields or '
                        f'None, got {type(value).__name__}.')
    unknown = set(value) - {f.name for f in dataclasses.fields(QuantConfig)}
    if unknown:
        raise ValueError(f'quant.{what} has unknown keys {sorted(unknown)}; '
                         f'valid keys: '
                         f'{[f.name for f in dataclasses.fields(QuantConfig)]}.')
    return QuantConfig(**{**default.to_dict(), **value})


@dataclass
class InjectConfig:
    r"""What to quantize.  Built from the ``quant=dict(...)`` of ``GPLQModel``.

    Args:
        scope: ``whole`` (backbone + neck + heads) or ``backbone``.
        act: Input quantizer of every Linear/Conv2d (default: 4-bit,
            per channel, symmetric, LSQ-learned, initialised at the 0.1th/
            99.9th percentiles; the paper's min-max initialisation is
            ``act=dict(observer='minmax')``, measured in docs/ablation.md).
        first_layer_bits: Bits of the patch-embedding input (the image).
        qkv: Quantizer of q, k, v (default 4-bit per token, 1st/99th
            percentile calibration); ``None`` leaves attention unquantized.
        softmax: Quantizer of the post-softmax probabilities (default 4-bit
            log-sqrt2); ``None`` leaves them unquantized.
        weight: Weight fake quantizer for the direct-W4A4-QAT baseline
            (``None``: FP32 weights, i.e. GPLQ stage 1).
        generic: Quantize Linear/Conv2d inputs of an unknown architecture
            (no attention quantization).  Must be asked for explicitly.
        skip: Regexes of module names (relative to the detector/classifier)
            left in float.
        act_overrides: ``{regex: {QuantConfig fields}}``: the input quantizer
            of a Linear/Conv2d whose name matches ``regex`` (the first match,
            in order) is ``act`` with these fields replaced, e.g. 8 bits for
            the fc2 inputs of a ViT: ``{r'ffn\.layers\.1$': dict(bits=8)}``.
            The patch embedding keeps ``act`` at ``first_layer_bits``.  An
            unsigned grid (``signed=False``, codes [0, 15], no zero point)
            there clips GELU's negative lobe to 0: on DINOv2-S that is 66-97%
            of the fc2 inputs and top-1 collapses to chance
            (docs/ablation.md §5).
        add_bias: Regexes of Linear layers without a bias that get one
            (zeros) at injection: RepQ-ViT's reparameterization moves an
            offset into the bias of Swin's patch-merging reduction, which
            has none (``gplq_mm.ptq.repqvit``).
    """
    scope: str = 'whole'
    act: Optional[QuantConfig] = field(default_factory=lambda: QuantConfig(
        observer='percentile', percentile=(0.1, 99.9)))
    first_layer_bits: int = 8
    qkv: Optional[QuantConfig] = field(default_factory=lambda: QuantConfig(
        granularity='per_token', observer='percentile'))
    softmax: Optional[QuantConfig] = field(default_factory=lambda: QuantConfig(
        granularity='per_tensor', signed=False, kind='log2', learnable=False))
    weight: Optional[WeightQuantConfig] = None
    generic: bool = False
    skip: Tuple[str, ...] = ()
    act_overrides: Dict[str, dict] = field(default_factory=dict)
    add_bias: Tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> 'InjectConfig':
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f'quant has unknown keys {sorted(unknown)}; valid '
                             f'keys: {[f.name for f in dataclasses.fields(cls)]}.')
        base = cls()
        kw = dict(d)
        for key in ('act', 'qkv', 'softmax'):
            if key in d:
                kw[key] = _qcfg(d[key], getattr(base, key) or QuantConfig(), key)
        if d.get('weight') is not None and isinstance(d['weight'], dict):
            kw['weight'] = WeightQuantConfig(**d['weight'])
        for key in ('skip', 'add_bias'):
            if key in d:
                kw[key] = tuple(d[key])
        if 'act_overrides' in d:
            kw['act_overrides'] = {} if d['act_overrides'] is None \
                else d['act_overrides']
        return cls(**kw)

    def __post_init__(self):
        if self.scope not in ('whole', 'backbone'):
            raise ValueError(f'quant.scope={self.scope!r}: use "whole" '
                             '(backbone + neck + heads) or "backbone".')
        if self.act is None:
            raise ValueError('quant.act must be set: GPLQ quantizes activations.')
        # validates the bit width through QuantConfig
        QuantConfig(**{**self.act.to_dict(), 'bits': self.first_layer_bits})
        for pattern in self.skip + tuple(self.add_bias):
            re.compile(pattern)
        if not isinstance(self.act_overrides, dict):
            raise TypeError('quant.act_overrides must be a dict {regex: dict of '
                            'QuantConfig fields}, got '
                            f'{type(self.act_overrides).__name__}.')
        for pattern, fields in self.act_overrides.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f'quant.act_overrides: {pattern!r} is not a '
                                 f'regex ({e}).') from None
            _qcfg(dict(fields), self.act, f'act_overrides[{pattern!r}]')

    def act_for(self, name: str) -> QuantConfig:
        """The input quantizer config of the Linear/Conv2d ``name``."""
        for pattern, fields in self.act_overrides.items():
            if re.search(pattern, name):
                return _qcfg(dict(fields), self.act,
                             f'act_overrides[{pattern!r}]')
        return self.act


@dataclass
class InjectionRecord:
    name: str
    kind: str  # Linear / Conv2d / attention
    detail: str


@dataclass
class InjectionReport:
    records: List[InjectionRecord]
    left_float: List[Tuple[str, str]]  # (name, reason)

    def table(self) -> str:
        """Grouped summary: one row per module-name pattern (indices -> *)."""
        groups: 'OrderedDict[tuple, int]' = OrderedDict()
        for r in self.records:
            key = (re.sub(r'\.\d+(?=\.|$)', '.*', r.name), r.kind, r.detail)
            groups[key] = groups.get(key, 0) + 1
        w = max([len(k[0]) for k in groups] + [6])
        lines = [f'{"module":<{w}}  {"type":<9}  {"count":>5}  quantized',
                 '-' * (w + 40)]
        for (pattern, kind, detail), n in groups.items():
            lines.append(f'{pattern:<{w}}  {kind:<9}  {n:>5}  {detail}')
        lines.append(f'{len(self.records)} modules quantized')
        if self.left_float:
            kinds = OrderedDict()
            for name, why in self.left_float:
                kinds.setdefault(why, []).append(name)
            for why, names in kinds.items():
                lines.append(f'left in float ({why}): {len(names)}, e.g. '
                             f'{", ".join(names[:3])}')
        return '\n'.join(lines)


def _full_name(cls: type) -> str:
    return f'{cls.__module__}.{cls.__name__}'


def backbone_kind(model: nn.Module) -> Optional[str]:
    """'det_swin' | 'cls_swin' | 'vit' | None for the model's backbone."""
    bb = getattr(model, 'backbone', None)
    if bb is None:
        return None
    from mmdet.models.backbones.swin import SwinTransformer as DetSwin
    from mmpretrain.models.backbones.swin_transformer import \
        SwinTransformer as ClsSwin
    from mmpretrain.models.backbones.vision_transformer import \
        VisionTransformer
    if isinstance(bb, DetSwin):
        return 'det_swin'
    if isinstance(bb, ClsSwin):
        return 'cls_swin'
    if isinstance(bb, VisionTransformer):
        return 'vit'
    return None


def _attention_tokens(kind: str, backbone: nn.Module, attn: nn.Module) -> int:
    if kind in ('det_swin', 'cls_swin'):
        return attn.window_size[0] * attn.window_size[1]
    pr = backbone.patch_resolution
    return pr[0] * pr[1] + backbone.num_extra_tokens


def inject(model: nn.Module, cfg: InjectConfig) -> InjectionReport:
    """Insert quantizers into ``model`` (a built mmdet detector or mmpretrain
    classifier) in place.  Parameters are shared, not copied."""
    kind = backbone_kind(model)
    if kind is None and not cfg.generic:
        bb = getattr(model, 'backbone', None)
        found = _full_name(type(bb)) if bb is not None else \
            f'{_full_name(type(model))} (no .backbone)'
        raise ValueError(
            f'gplq_mm does not know how to quantize backbone {found}. '
            f'Supported: {"; ".join(SUPPORTED_BACKBONES)}. To quantize the '
            'inputs of every Linear/Conv2d of another architecture without '
            'attention quantization, set quant=dict(generic=True, ...).')
    if cfg.scope == 'backbone':
        if not hasattr(model, 'backbone'):
            raise ValueError('quant.scope="backbone" needs a model with a '
                             '.backbone; use scope="whole".')
        roots = ['backbone']
    else:
        roots = [n for n, _ in model.named_children() if n != 'data_preprocessor']
    skip = [re.compile(p) for p in cfg.skip]
    attn_types = tuple(attention_classes()) if kind is not None else ()
    first_conv = 'backbone.patch_embed.projection' if kind else None
    records, left = [], []
    first_cfg = dataclasses.replace(cfg.act, bits=cfg.first_layer_bits)

    targets = []
    for root in roots:
        for sub, m in model.get_submodule(root).named_modules():
            targets.append((f'{root}.{sub}' if sub else root, m))
    for name, m in targets:
        if any(p.search(name) for p in skip):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                left.append((name, 'skip pattern'))
            continue
        if attn_types and isinstance(m, attn_types) and (
                cfg.qkv is not None or cfg.softmax is not None):
            n_tok = _attention_tokens(kind, model.backbone, m)
            quantize_attention(m, cfg.qkv, cfg.softmax, n_tok, name)
            records.append(InjectionRecord(
                name, 'attention',
                f'q,k,v: {_desc(cfg.qkv)} ({n_tok} tokens); softmax: '
                f'{_desc(cfg.softmax)}'))
            continue
        if isinstance(m, (QLinear, QConv2d)):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not _plain_layer(m):
            # e.g. mmcv ConvWS2d / Conv2dAdaptivePadding: QLinear/QConv2d
            # would silently drop what their forward adds
            left.append((name, f'{type(m).__name__} has its own forward'))
            continue
        if isinstance(m, nn.Linear):
            act = cfg.act_for(name)
            new = QLinear.from_float(m, act, cfg.weight, name)
            if new.bias is None and any(re.search(p, name)
                                        for p in cfg.add_bias):
                new.bias = nn.Parameter(new.weight.new_zeros(
                    new.out_features))
            model.set_submodule(name, new)
            records.append(InjectionRecord(name, 'Linear', _desc_lin(
                act, cfg.weight)))
        elif isinstance(m, nn.Conv2d):
            if first_conv is None and cfg.generic:
                first_conv = name
            act = first_cfg if name == first_conv else cfg.act_for(name)
            new = QConv2d.from_float(m, act, cfg.weight, name)
            model.set_submodule(name, new)
            records.append(InjectionRecord(name, 'Conv2d', _desc_lin(
                new.act_quant.cfg, cfg.weight)))
        elif isinstance(m, nn.modules.conv._ConvNd):
            left.append((name, f'{type(m).__name__} not supported'))
    if not records:
        raise ValueError('quant injection found no Linear/Conv2d to quantize '
                         f'in scope {cfg.scope!r}.')
    return InjectionReport(records, left)


def _plain_layer(m: nn.Module) -> bool:
    """Whether ``m`` computes exactly ``nn.Linear``/``nn.Conv2d``'s forward:
    the torch class, mmcv's thin wrappers (their forward only special-cases
    empty inputs on torch < 1.5), or a subclass that keeps the forward."""
    from mmcv.cnn.bricks import wrappers
    base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
    cls = type(m)
    return cls.forward is base.forward or cls in (wrappers.Linear,
                                                  wrappers.Conv2d)


def _desc(cfg: Optional[QuantConfig]) -> str:
    return 'float' if cfg is None else cfg.describe()


def _desc_lin(act: QuantConfig, weight: Optional[WeightQuantConfig]) -> str:
    w = 'W32' if weight is None else f'W{weight.bits} per-out-channel'
    return f'{w}, input {act.describe()}'
