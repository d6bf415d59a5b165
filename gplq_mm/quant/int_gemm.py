"""Integer GEMM backends for the W4A4 integer layers (:class:`IntQLinear`).

The integer layers compute ``acc = (Xc << e) @ Wc^T`` on integer codes and
then rescale per output channel.  Two backends compute ``acc``:

* ``'reference'``: ``F.linear`` on the codes held in float32.  Exact because
  every partial sum is an integer below 2^24 (|x| <= 128, |w| <= 8, so for
  K < 16,384 inputs); runs on every device, at float GEMM speed.
* ``'onednn'``: x86 CPUs.  The shifted codes go to uint8 (signed codes with
  zero point 128, unsigned ones with 0), the weight codes are prepacked once
  as int8, and oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``,
  the kernel torch's x86 quantization uses) accumulates in int32 and
  returns ``float(acc) * d`` (d: the per-output-channel weight scale).
  Bit-exact against ``'reference'``: the same integers, one float rounding
  of the same product.

``'auto'`` (the layers' default) picks ``'onednn'`` where it runs and the
codes fit 8 bits, and otherwise falls back to ``'reference'`` with one log
line that names the reason.  There is no CUDA integer path yet (CUDA layers
run ``'reference'``; ``torch._int_mm`` is the obvious candidate).
"""
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger('gplq_mm')

BACKENDS = ('auto', 'onednn', 'reference')
_warned = set()


def _log_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def onednn_available() -> bool:
    """True when this torch build has oneDNN's int8 linear (x86 CPUs)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.onednn, 'qlinear_pointwise')
    except (AttributeError, RuntimeError):
        return False


def code_range(qmin: int, qmax: int, max_shift: int) -> Tuple[int, int]:
    """Range of activation codes shifted left by at most ``max_shift``."""
    return qmin * 2 ** max_shift, qmax * 2 ** max_shift


def zero_point_for(lo: int, hi: int) -> Optional[int]:
    """uint8 zero point that holds codes in ``[lo, hi]``, or None."""
    if lo >= 0 and hi <= 255:
        return 0
    if lo >= -128 and hi <= 127:
        return 128
    return None


class OneDNNLinear:
    """Int8 weight codes prepacked for oneDNN, with their per-output-channel
    scales.

    Holds an opaque oneDNN tensor: not a buffer (not saved, not copied);
    the integer layer rebuilds it from its packed int4 weight when needed.
    """

    def __init__(self, weight_codes: Tensor, weight_scale: Tensor,
                 zero_point: int):
        w = weight_codes.detach().reshape(weight_codes.shape[0], -1)
        self.out_features = w.shape[0]
        self.packed = torch.ops.onednn.qlinear_prepack(
            w.round().to(torch.int8), None)
        # the kernel returns float(acc) * (1.0 * scale): one rounding, as
        # the reference's float(acc) * scale.  The bias stays outside: a
        # fused bias may be added by an FMA (a second rounding skipped).
        self.scale = weight_scale.detach().float().clone()
        self.zeros = torch.zeros(self.out_features, dtype=torch.long,
                                 device=w.device)
        self.zero_point = int(zero_point)

    def __call__(self, codes: Tensor) -> Tensor:
        """``float(codes @ Wc^T) * scale`` for integer-valued float ``codes``
        (overwritten: the caller's temporary)."""
        lead = codes.shape[:-1]
        x = codes.reshape(-1, codes.shape[-1])
        if self.zero_point:
            x = x.add_(self.zero_point)
        y = torch.ops.onednn.qlinear_pointwise(
            x.to(torch.uint8), 1.0, self.zero_point, self.packed, self.scale,
            self.zeros, None, 1.0, 0, torch.float32, 'none', [], '')
        return y.reshape(*lead, self.out_features)


def reference_linear(codes: Tensor, weight_codes: Tensor) -> Tensor:
    """The exact float path: ``F.linear`` on integer-valued float tensors."""
    return F.linear(codes, weight_codes)


def choose_backend(requested: str, device: torch.device, lo: int, hi: int,
                   name: str = '') -> Tuple[str, Optional[int]]:
    """``(backend, zero_point)`` for a layer whose codes lie in ``[lo, hi]``.

    ``requested='onednn'`` raises where it cannot run; ``'auto'`` falls back
    to ``'reference'`` and logs why, once per reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f'int_gemm={requested!r}: choose one of {BACKENDS}.')
    if requested == 'reference':
        return 'reference', None
    why = None
    zp = zero_point_for(lo, hi)
    if device.type != 'cpu':
        why = (f'no integer GEMM backend for {device.type} tensors yet; the '
               'integer layers compute their exact integer sums in float32')
    elif not onednn_available():
        why = ('this torch build has no oneDNN int8 linear '
               '(torch.ops.onednn.qlinear_pointwise); the integer layers '
               'compute their exact integer sums in float32')
    elif zp is None:
        why = (f'{name}: shifted activation codes span [{lo}, {hi}], more '
               'than 8 bits; this layer computes its exact integer sums in '
               'float32 (lower WeightQuantConfig.max_shift to 4 for 4-bit '
               'activations to use the int8 GEMM)')
    if why is None:
        return 'onednn', zp
    if requested == 'onednn':
        raise RuntimeError(f'int_gemm="onednn" cannot run: {why}.')
    _log_once(why, f'gplq_mm integer layers: {why}.')
    return 'reference', None
