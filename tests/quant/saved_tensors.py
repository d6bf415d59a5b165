"""What autograd saves for backward (the memory tests of tests/quant)."""
import torch


def saved_tensors(fn):
    """Run ``fn()``; return its output and every tensor autograd saved."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def ptrs(ts):
    """Storage identity of tensors: equal lists mean the same memory."""
    return sorted((t.data_ptr(), tuple(t.shape)) for t in ts)
