"""PCA feature mimicking (GPLQ eq. 2, after TCS).

The teacher is the frozen FP32 model.  A PCA basis of its penultimate features
is computed once (streaming float64 sums, all-reduced under DDP); the loss is
the squared distance between student and teacher features projected on the
top-``k`` principal components, summed over components and averaged over the
batch.  ``k`` is the smallest count explaining ``var_ratio`` of the variance,
rounded up to a multiple of ``multiple`` (Swin-T: 768 -> 256, DeiT-T: 192 ->
64 in the paper).
"""
import copy
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor, nn

from gplq_mm.quant import QConv2d, QLinear, QState, set_act_state
from gplq_mm.quant.observers import all_reduce_


@dataclass
class MimicConfig:
    """Args:
        enabled: Add the mimic loss.
        feature: Module whose output is the feature: ``neck`` (classifier
            penultimate features) or ``backbone`` (detectors: the last stage,
            average-pooled).  ``auto`` = neck if the model has one, else backbone.
        var_ratio: Share of teacher feature variance the basis must explain.
        multiple: Round ``k`` up to a multiple of this (hardware friendliness).
        weight: Loss weight (the paper gives none; measure).
        num_batches: Training batches used to fit the PCA basis.
    """
    enabled: bool = False
    feature: str = 'auto'
    var_ratio: float = 0.6
    multiple: int = 32
    weight: float = 1.0
    num_batches: int = 16

    def __post_init__(self):
        if self.feature not in ('auto', 'neck', 'backbone'):
            raise ValueError(f'mimic.feature={self.feature!r}: use "auto", '
                             '"neck" or "backbone".')
        if not 0.0 < self.var_ratio <= 1.0:
            raise ValueError(f'mimic.var_ratio={self.var_ratio} must be in '
                             '(0, 1], e.g. 0.6.')
        if self.multiple < 1 or self.num_batches < 1 or self.weight < 0:
            raise ValueError('mimic.multiple and mimic.num_batches must be '
                             '>= 1 and mimic.weight >= 0.')


def pool_feature(feat) -> Tensor:
    """Last element of a tuple of features, tuples of tokens averaged,
    spatial maps average-pooled: ``[B, C]``."""
    if isinstance(feat, (tuple, list)):
        feat = feat[-1]
    if isinstance(feat, (tuple, list)):  # e.g. distilled DeiT (cls, dist)
        feat = torch.stack(list(feat), 0).mean(0)
    if feat.ndim == 4:
        feat = feat.mean(dim=(2, 3))
    elif feat.ndim == 3:
        feat = feat.mean(dim=1)
    return feat


class PCAAccumulator:
    """Streaming mean/covariance of ``[B, C]`` features in float64."""

    def __init__(self, dim: int):
        self.dim = dim
        self.s = torch.zeros(dim, dtype=torch.float64)
        self.ss = torch.zeros(dim, dim, dtype=torch.float64)
        self.n = 0

    def update(self, f: Tensor) -> None:
        f = f.detach().reshape(-1, self.dim).double().cpu()
        self.s += f.sum(0)
        self.ss += f.t() @ f
        self.n += f.shape[0]

    def all_reduce(self) -> None:
        # float64 CPU sums; under NCCL (stage 1 on GPUs) they are reduced on
        # the GPU and copied back
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        for t in (self.s, self.ss, n):
            all_reduce_(t)
        self.n = int(n.item())

    def basis(self, var_ratio: float, multiple: int) -> Tuple[Tensor, Tensor, float]:
        """Returns ``(mean [C], components [C, k], explained share)``."""
        if self.n < 2:
            raise ValueError('PCA for feature mimicking needs at least 2 '
                             f'feature vectors, got {self.n}; raise '
                             'mimic.num_batches.')
        mean = self.s / self.n
        cov = self.ss / self.n - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        k = select_k(evals, var_ratio, multiple)
        explained = float(evals[:k].sum() / evals.sum().clamp_min(1e-30))
        return mean.float(), evecs[:, :k].float().contiguous(), explained


def select_k(evals_desc: Tensor, var_ratio: float, multiple: int) -> int:
    """Smallest k explaining ``var_ratio``, rounded up to ``multiple`` (<= C)."""
    total = float(evals_desc.sum())
    c = evals_desc.numel()
    if total <= 0:
        return min(multiple, c)
    cum = torch.cumsum(evals_desc, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(var_ratio, dtype=cum.dtype))) + 1
    k = -(-k // multiple) * multiple
    return max(1, min(k, c))


def capture_output(module: nn.Module, store: dict, key: str):
    """Forward hook storing ``module``'s output as ``store[key]``; returns
    the handle (``.remove()`` it)."""
    return module.register_forward_hook(
        lambda m, i, o: store.__setitem__(key, o))


def make_teacher(model: nn.Module) -> nn.Module:
    """Frozen FP32 copy of the model wrapped by ``model`` (a GPLQModel):
    quantizers off, weights float."""
    teacher = copy.deepcopy(model.model)
    set_act_state(teacher, QState.OFF)
    for m in teacher.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.weight_quant = None
    return teacher


def mimic_loss(f_student: Tensor, f_teacher: Tensor, mean: Tensor,
               components: Tensor) -> Tensor:
    """``mean_b || (f_s - mu) V - (f_t - mu) V ||^2`` (paper eq. 2)."""
    ps = (f_student - mean) @ components
    pt = (f_teacher.detach() - mean) @ components
    return (ps - pt).pow(2).sum(dim=1).mean()
