"""Small, self-validating quantizer configs (no mm* imports)."""
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

GRANULARITIES = ('per_tensor', 'per_channel', 'per_token')
OBSERVERS = ('minmax', 'percentile', 'mse', 'repq')
KINDS = ('uniform', 'log2')
FOLDS = ('pow2', 'full')
ROUNDINGS = ('nearest', 'gptq')


@dataclass
class QuantConfig:
    """How one tensor is fake-quantized.

    Args:
        bits: Bit width, 2 to 8.
        granularity: ``per_tensor``, ``per_channel`` (one scale per entry of
            ``axis``, by default the last axis, i.e. the input channels of a
            Linear) or ``per_token`` (one scale per token position, axis -2 of a
            ``[..., N, C]`` tensor; the token count is fixed per module, e.g. a
            Swin window or a ViT sequence).
        axis: Axis that carries the scales. ``None`` picks the default of the
            granularity (-1 per channel, -2 per token).
        signed: Symmetric signed grid ``[-2^(b-1), 2^(b-1)-1]``; ``False`` gives
            the unsigned grid ``[0, 2^b-1]`` (e.g. post-softmax, post-GELU).
        kind: ``uniform`` or ``log2`` (RepQ-ViT's log-sqrt2 quantizer, for
            post-softmax values in [0, 1]; unsigned, not learnable).
        zero_point: Asymmetric (affine) uniform grid: codes ``[0, 2^b-1]``
            and a zero point per scale, ``x = (q - z) * s`` (the RepQ-ViT
            baseline, :mod:`gplq_mm.ptq.repqvit`).  Needs ``signed=False``
            and ``learnable=False``; fake quantization only (no integer
            layer, no ONNX export).
        observer: Calibration statistic: ``minmax``, ``percentile``,
            ``mse`` (the clipping range of least squared quantization error,
            searched on the same histogram as ``percentile``) or ``repq``
            (RepQ-ViT's own search: exact quantiles of the whole calibration
            tensor at 99.9/99.99/99.999%, the one of least squared error;
            keeps every observed value, so calibrate with one batch).
        percentile: (low, high) percentiles for the ``percentile`` observer.
        learnable: Learn the scale with LSQ during training.
        bins: Histogram bins of the percentile observer (a power of two; the
            histogram spans a power-of-two range so that streaming and
            one-shot calibration bin every value identically).
    """

    bits: int = 4
    granularity: str = 'per_channel'
    axis: Optional[int] = None
    signed: bool = True
    kind: str = 'uniform'
    zero_point: bool = False
    observer: str = 'minmax'
    percentile: Tuple[float, float] = (1.0, 99.0)
    learnable: bool = True
    bins: int = 2048

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not 2 <= self.bits <= 8:
            raise ValueError(
                f'bits={self.bits!r} is not supported: use an integer from 2 '
                'to 8 (e.g. bits=4 for W4A4, 8 for the patch embedding).')
        if self.granularity not in GRANULARITIES:
            raise ValueError(f'granularity={self.granularity!r} is unknown: '
                             f'choose one of {GRANULARITIES}.')
        if self.observer not in OBSERVERS:
            raise ValueError(f'observer={self.observer!r} is unknown: '
                             f'choose one of {OBSERVERS}.')
        if self.kind not in KINDS:
            raise ValueError(
                f'kind={self.kind!r} is unknown: choose one of {KINDS}.')
        if self.kind == 'log2':
            if self.signed:
                raise ValueError('kind="log2" quantizes non-negative values '
                                 '(post-softmax): set signed=False.')
            if self.learnable:
                raise ValueError('kind="log2" has a fixed scale: set '
                                 'learnable=False (or use kind="uniform").')
            if self.observer == 'mse':
                raise ValueError('observer="mse" searches a uniform grid; '
                                 'kind="log2" takes "minmax" or "percentile".')
        if self.zero_point and (self.signed or self.kind != 'uniform' or
                                self.learnable):
            raise ValueError(
                'zero_point=True is the asymmetric uniform grid of the '
                'RepQ-ViT baseline: set signed=False, kind="uniform" and '
                'learnable=False (LSQ learns zero-point-free scales).')
        if self.observer == 'repq' and not (self.zero_point or
                                            self.kind == 'log2'):
            raise ValueError(
                'observer="repq" searches RepQ-ViT\'s asymmetric or '
                'log-sqrt2 grids: set zero_point=True (with signed=False) or '
                'kind="log2", or use observer="mse" for a symmetric grid.')
        if self.observer == 'repq' and self.granularity == 'per_token':
            raise ValueError('observer="repq" calibrates per tensor or per '
                             'channel (RepQ-ViT), not per token.')
        self.percentile = tuple(float(p) for p in self.percentile)
        if len(self.percentile) != 2 or \
                not 0.0 <= self.percentile[0] < self.percentile[1] <= 100.0:
            raise ValueError(
                f'percentile={self.percentile} must satisfy 0 <= low < high '
                '<= 100, e.g. (1.0, 99.0).')
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) \
                or self.bins < 8 or self.bins & (self.bins - 1):
            raise ValueError(f'bins={self.bins} must be a power of two >= 8 '
                             '(the histogram is rebinned by doubling).')
        if self.granularity == 'per_tensor':
            self.axis = None
        elif self.axis is None:
            self.axis = -1 if self.granularity == 'per_channel' else -2

    @property
    def qmin(self) -> int:
        return -(2**(self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2**(self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``A4 per_channel(-1) minmax``."""
        where = self.granularity if self.axis is None \
            else f'{self.granularity}({self.axis})'
        kind = '' if self.kind == 'uniform' else f' {self.kind}'
        sign = ' asym' if self.zero_point else \
            ('' if self.signed else ' unsigned')
        return f'{self.bits}b {where}{kind}{sign} {self.observer}'


@dataclass
class WeightQuantConfig:
    """Per-output-channel symmetric weight quantization (stage 2, baselines).

    Args:
        bits: Bit width, 2 to 8.
        axis: Output-channel axis of the weight (0 for Linear and Conv2d).
        search: Clipping search: ``mse`` tries ``num_candidates`` clipping
            ratios in ``[min_ratio, 1]`` of each channel's abs-max and keeps the
            one with the smallest squared reconstruction error; ``minmax`` uses
            the abs-max directly.
        learnable: Learn the scale with LSQ (direct W4A4 QAT baseline).
        fold: How the per-input-channel activation scale ``s`` enters the
            integer layer.  ``full``: ``W diag(s)`` is quantized (the integer
            GEMM reads the 4-bit codes as they are).  ``pow2``: ``s`` is split
            into ``t * 2^e`` with integer shifts ``0 <= e <= max_shift``; the
            codes are shifted left by ``e`` before the integer GEMM (A4 codes
            in an int(4 + max_shift) GEMM, uint for unsigned grids; exact) and
            only ``W diag(t)`` is
            quantized, so the activation outlier channels no longer inflate
            each weight row's range (measured on DINOv2-S: docs/ablation.md).
        max_shift: Largest shift of ``fold='pow2'`` (4: the shifted codes fit
            int8, uint8 for an unsigned grid).
        rounding: How the codes are chosen on the searched grid.
            ``nearest``: each entry to its nearest code.  ``gptq``: GPTQ
            (:mod:`.gptq`) against the Gram matrix of the layer's calibration
            inputs, for Linear layers that get one (stage 2 collects it; see
            ``gptq_max_columns``); others round to nearest.  Same grid, same
            integer layers.
        gptq_damp: GPTQ's diagonal damping, a fraction of the mean diagonal.
        gptq_max_columns: Linear layers with more inputs than this round to
            nearest (their ``[K, K]`` float64 Gram matrix would cost
            ``8 K^2`` bytes: a Mask R-CNN RoI head's 12544-input FC 1.2 GB).
    """

    bits: int = 4
    axis: int = 0
    search: str = 'mse'
    min_ratio: float = 0.5
    num_candidates: int = 51
    learnable: bool = False
    fold: str = 'pow2'
    max_shift: int = 4
    rounding: str = 'nearest'
    gptq_damp: float = 0.01
    gptq_max_columns: int = 4096
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not 2 <= self.bits <= 8:
            raise ValueError(
                f'weight bits={self.bits!r} is not supported: use an integer '
                'from 2 to 8.')
        if self.search not in ('mse', 'minmax'):
            raise ValueError(f'search={self.search!r} is unknown: use "mse" '
                             'or "minmax".')
        if self.fold not in FOLDS:
            raise ValueError(f'fold={self.fold!r} is unknown: use "pow2" (shift '
                             'the activation codes, fold the rest) or "full".')
        if isinstance(self.max_shift, bool) or not isinstance(
                self.max_shift, int) or not 0 <= self.max_shift <= 12:
            raise ValueError(f'max_shift={self.max_shift!r} must be an int '
                             'from 0 to 12 (4: shifted 4-bit codes fit int8).')
        if self.rounding not in ROUNDINGS:
            raise ValueError(f'rounding={self.rounding!r} is unknown: use '
                             '"nearest" or "gptq".')
        if not self.gptq_damp > 0 or self.gptq_max_columns < 1:
            raise ValueError(f'gptq_damp={self.gptq_damp} must be > 0 and '
                             f'gptq_max_columns={self.gptq_max_columns} >= 1.')
        if not 0.0 < self.min_ratio <= 1.0 or self.num_candidates < 1:
            raise ValueError('min_ratio must be in (0, 1] and num_candidates '
                             f'>= 1, got {self.min_ratio}, '
                             f'{self.num_candidates}.')

    @property
    def qmin(self) -> int:
        return -(2**(self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**(self.bits - 1) - 1

    def to_dict(self) -> dict:
        return asdict(self)
