"""Quantization-aware attention forwards for mmdet / mmpretrain attention.

The attention matmuls are inline code in mmdet's and mmpretrain's modules, so
quantizing their inputs (q, k, v per token; post-softmax probabilities) needs a
forward of our own.  We swap the module's class for a subclass whose forward
is the original one plus four quantizers; parameter names stay unchanged, so
FP32 checkpoints load as before, and ``to_float`` restores the original class.
"""
from typing import Dict, Optional, Type

import torch
from torch import nn

from gplq_mm.quant import ActQuantizer, QState, QuantConfig
from gplq_mm.quant.kernels import quant_attention

# Use the fused, recomputing attention core whenever it applies (set to False
# to run the plain op-by-op forward, e.g. to compare the two).
FUSED_ATTENTION = True

_QUANT_CLASSES: Dict[type, type] = {}


class _QAttnMixin:
    """Adds ``q_quant, k_quant, v_quant, attn_quant`` to an attention module."""

    def _add_quantizers(self, qkv_cfg: Optional[QuantConfig],
                        softmax_cfg: Optional[QuantConfig], num_tokens: int,
                        name: str) -> None:
        """``None`` configs leave that input in float (an ``nn.Identity``)."""
        for attr in ('q_quant', 'k_quant', 'v_quant'):
            if qkv_cfg is None:
                setattr(self, attr, nn.Identity())
                continue
            # per token: one scale per token position (axis -2 of [B,h,N,d]);
            # per channel: one per head dimension (axis -1)
            n = {'per_token': num_tokens, 'per_channel': self._head_dims(),
                 'per_tensor': 1}[qkv_cfg.granularity]
            setattr(self, attr, ActQuantizer(qkv_cfg, n, f'{name}.{attr}'))
        # post-softmax: one scale (per tensor); log-sqrt2 or unsigned uniform
        self.attn_quant = nn.Identity() if softmax_cfg is None else \
            ActQuantizer(softmax_cfg, 1, f'{name}.attn_quant')

    def _head_dims(self) -> int:
        return self.embed_dims // self.num_heads

    def _fused_quant_specs(self, q: torch.Tensor, attn_drop_active: bool,
                           *others: Optional[torch.Tensor]):
        """Quantizer arguments of :func:`quant_attention`, or ``None`` when
        the op-by-op forward must run (calibration, quantizers off, attention
        dropout, autocast, mixed dtypes of ``q`` and ``others``)."""
        # (an ONNX export traces the op-by-op forward: one gplq::QDQ node
        # per quantizer)
        if not FUSED_ATTENTION or attn_drop_active or \
                torch.onnx.is_in_onnx_export() or \
                torch.is_autocast_enabled(q.device.type) or \
                any(t is not None and t.dtype != q.dtype for t in others):
            return None
        specs = []
        for attr in ('q_quant', 'k_quant', 'v_quant', 'attn_quant'):
            qz = getattr(self, attr)
            if not isinstance(qz, ActQuantizer):
                specs.append(None)
                continue
            if qz.state not in (QState.LEARNING, QState.FROZEN) or \
                    qz.cfg.zero_point:
                return None
            s = qz.effective_scale(q.ndim)
            if s.dtype != q.dtype:
                return None
            if qz.cfg.kind == 'log2':
                specs.append(('log2', s.detach(), qz.cfg.bits))
            elif attr == 'attn_quant':
                specs.append(('uniform', s, qz.cfg.qmin, qz.cfg.qmax))
            else:
                specs.append((s, qz.cfg.qmin, qz.cfg.qmax))
        return specs

    def _check_quant_inputs(self, q, k, v) -> None:
        for attr, t in (('q_quant', q), ('k_quant', k), ('v_quant', v)):
            qz = getattr(self, attr)
            if isinstance(qz, ActQuantizer):
                qz.check_ready(t)
        if isinstance(self.attn_quant, ActQuantizer):
            # the probabilities are [B, h, N, N]; only per-tensor is allowed
            if not bool(self.attn_quant.initialized):
                self.attn_quant.check_ready(q)


class QWindowMSAMixin(_QAttnMixin):
    """Forward of mmdet/mmpretrain ``WindowMSA`` with quantized matmul inputs."""

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(
                self.window_size[0] * self.window_size[1],
                self.window_size[0] * self.window_size[1], -1)
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        specs = self._fused_quant_specs(
            q, self.training and self.attn_drop.p > 0, bias, mask)
        if specs is not None:
            self._check_quant_inputs(q, k, v)
            x = quant_attention(q, k, v, self.scale, *specs, bias=bias,
                                mask=mask)
            x = x.transpose(1, 2).reshape(B, N, C)
            return self.proj_drop(self.proj(x))
        q = self.q_quant(q * self.scale)
        attn = q @ self.k_quant(k).transpose(-2, -1)
        attn = attn + bias
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N,
                             N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_quant(self.softmax(attn))
        attn = self.attn_drop(attn)
        x = (attn @ self.v_quant(v)).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class QMultiheadAttentionMixin(_QAttnMixin):
    """Forward of mmpretrain ``MultiheadAttention`` (ViT/DeiT), quantized.

    mmpretrain calls ``F.scaled_dot_product_attention``; we write the same
    computation out (scale ``head_dims**-0.5`` as mmpretrain uses in both of
    its branches) so the matmul inputs can be quantized.
    """

    def _head_dims(self) -> int:
        return self.head_dims

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        specs = self._fused_quant_specs(
            q, self.training and self.attn_drop > 0)
        if specs is not None:
            self._check_quant_inputs(q, k, v)
            x = quant_attention(q, k, v, self.head_dims**-0.5, *specs)
        else:
            q = self.q_quant(q * self.head_dims**-0.5)
            attn = self.attn_quant(
                (q @ self.k_quant(k).transpose(-2, -1)).softmax(-1))
            if self.training and self.attn_drop > 0:
                attn = torch.nn.functional.dropout(attn, self.attn_drop)
            x = attn @ self.v_quant(v)
        x = x.transpose(1, 2).reshape(B, N, self.embed_dims)
        x = self.proj(x)
        x = self.out_drop(self.gamma1(self.proj_drop(x)))
        if self.v_shortcut:
            x = v.squeeze(1) + x
        return x


def _quant_class(base: type, mixin: type) -> Type[nn.Module]:
    if base not in _QUANT_CLASSES:
        _QUANT_CLASSES[base] = type(f'Q{base.__name__}', (mixin, base),
                                    {'_float_class': base})
    return _QUANT_CLASSES[base]


def attention_classes():
    """``{float attention class: mixin}`` for the attention we know how to quantize."""
    from mmdet.models.backbones.swin import WindowMSA as DetWindowMSA
    from mmpretrain.models.utils.attention import MultiheadAttention
    from mmpretrain.models.utils.attention import WindowMSA as ClsWindowMSA
    return {
        DetWindowMSA: QWindowMSAMixin,
        ClsWindowMSA: QWindowMSAMixin,
        MultiheadAttention: QMultiheadAttentionMixin,
    }


def quantize_attention(mod: nn.Module, qkv_cfg: Optional[QuantConfig],
                       softmax_cfg: Optional[QuantConfig], num_tokens: int,
                       name: str) -> nn.Module:
    """Swap ``mod`` (in place) to its quantization-aware class."""
    table = attention_classes()
    base = type(mod)
    if base not in table:
        raise TypeError(f'{name}: no quantization-aware forward for '
                        f'{base.__module__}.{base.__name__}')
    mod.__class__ = _quant_class(base, table[base])
    mod._add_quantizers(qkv_cfg, softmax_cfg, num_tokens, name)
    return mod


def is_quant_attention(mod: nn.Module) -> bool:
    return isinstance(mod, _QAttnMixin)
