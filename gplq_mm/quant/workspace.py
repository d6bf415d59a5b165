"""Per-thread scratch buffers of the fused kernels (the lowest file of the
quantization core: it imports nothing but torch).
"""
import math
import threading

import torch
from torch import Tensor

# The fused paths (kernels.py: lsq_linear, lsq_conv2d, quant_attention, LSQ backward)
# keep their temporaries in per-thread scratch buffers that live across calls.
# On CPU every fresh multi-MB tensor costs page faults, and glibc leaves the
# freed temporaries as holes between long-lived activations, which raises the
# RSS peak of a training step by ~10% although no more tensors are alive.
# Reusing a few buffers (a few MiB in total, bounded by the chunk sizes in kernels.py)
# removes both.  Set WORKSPACE = False to allocate every temporary afresh.
WORKSPACE = True
WORKSPACE_MAX_ELEMS = 1 << 20  # larger temporaries are allocated normally
_WS = threading.local()


def _scratch(slot: str, shape, dtype, device) -> Tensor:
    """A scratch tensor for ``slot`` (CPU: reused across calls; never
    returned to callers nor saved for backward)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if not WORKSPACE or device.type != 'cpu' or n > WORKSPACE_MAX_ELEMS:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_WS, 'bufs', None)
    if bufs is None:
        bufs = _WS.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        bufs.pop((slot, dtype), None)  # free the old one before growing
        buf = bufs[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def clear_workspace() -> None:
    """Free this thread's scratch buffers (rebuilt on demand)."""
    _WS.bufs = {}
