"""Stage 2: weight PTQ with QwT compensation on a calibrated W32A4 model.

Order (what the paper asks for; docs/design.md §1):

1. activation quantizers frozen (scales from stage 1, or from PTQ calibration
   for the RepQ-ViT-style baseline);
2. with ``WeightQuantConfig.rounding='gptq'``: the Gram matrix of every
   Linear layer's integer input, one forward of the W32A4 model per
   calibration batch (:func:`collect_hessians`);
3. every Linear/Conv2d *outside* the transformer blocks (patch embedding,
   patch merging, neck, heads) is converted to its integer form: activation
   scale folded into the weight (``WeightQuantConfig.fold``: with ``'pow2'``,
   the default, only the part ``t`` of ``s = t * 2^e``; the shifts ``e`` act
   on the codes), per-output-channel 4-bit codes on a searched clipping
   range, rounded to nearest or by GPTQ (:mod:`gplq_mm.quant.gptq`);
4. transformer blocks in forward order: the block input X is produced by the
   already quantized and compensated model; the block is run with FP32
   weights (Y_fp) and with integer weights (Y_q), both on A4 inputs; the
   running float64 sums of QwT (X^T X, X^T (Y_fp - Y_q)) are accumulated
   batch by batch, the compensation is solved in closed form and kept only if
   it reduces the error on held-out batches.  Which batches are held out is a
   function of the global batch index (odd = held out), so a run split over
   several processes sees the same split as one process.

Memory is flat in the number of calibration images.  The live tensors are:
besides the running sums (and their float64 scratch, reused batch after
batch) nothing is kept across batches, and everything a block keeps (its FP32
copy, its integer layers, its sums) is allocated before its first batch.  The
process RSS under glibc is not flat by itself: freed temporaries stay resident
and land in ever other places of the heap, so the resident garbage grew with
the number of forward passes.  Freed heap pages are therefore handed back to
the OS (glibc ``malloc_trim``, :func:`release_heap`) after each block's setup
and twice per batch, after the prefix forward and after the block forwards,
so each of the two phases of a batch starts from a trimmed heap.
"""
import copy
import ctypes
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from gplq_mm.quant import (IntQConv2d, IntQLinear, QLinear, QState, QwTSums,
                           WeightQuantConfig, fit_qwt, set_act_state)
from gplq_mm.quant.gptq import hessian_update
from gplq_mm.quant.modules import integer_layer_input
from gplq_mm.quant.observers import all_reduce_
from gplq_mm.quant.qwt import QwTScratch
from .convert import (attach_qwt, block_width, convert_layer, float_layers,
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
    seconds: float = 0.0  # conversion + QwT accumulation and fit


@dataclass
class PTQReport:
    layers: List[LayerReport] = field(default_factory=list)
    blocks: List[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    # forwards run (this process): prefix = model forwards up to a block,
    # block = FP32 + integer block forwards, chained = block-input cache
    forwards: Dict[str, int] = field(default_factory=dict)
    # GPTQ: seconds of the forward that collects the input Gram matrices
    hessian_seconds: float = 0.0

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
                           use_learned_scale: bool = False,
                           hessians: Optional[Dict[str, torch.Tensor]] = None
                           ) -> None:
    block_names = [n for n, _ in transformer_blocks(model)]
    hessians = {} if hessians is None else hessians
    for name in float_layers(model):
        if any(name.startswith(b + '.') for b in block_names):
            continue
        w = model.get_submodule(name).weight
        new = convert_layer(model, name, w_cfg, use_learned_scale,
                            hessians.pop(name, None))
        report.layers.append(LayerReport(name, list(w.shape),
                                         _rel_error(new, w)))


def collect_hessians(model: nn.Module, batches: Callable[[], Iterable],
                     run: Callable[[object], None], w_cfg: WeightQuantConfig,
                     log: Callable[[str], None] = lambda msg: None
                     ) -> Dict[str, torch.Tensor]:
    """GPTQ's ``H = Z^T Z`` (float64) for every QLinear of the calibrated
    W32A4 ``model``, ``Z`` its integer-layer input (``integer_layer_input``),
    from one forward per calibration batch (``run``: the whole model, so that
    neck and head layers are reached).

    One pass for all layers, before any weight is quantized: the inputs come
    from the W32A4 model (4-bit activations, FP32 weights), not from the
    partly quantized one as in GPTQ's layer-by-layer pass; with the
    activations already on their 4-bit grid the two differ only by the
    upstream weight error, and the pass costs one forward per image.
    Under ``torch.distributed`` the sums are all-reduced (every process gets
    all batches' sums).  Conv2d layers and Linear layers wider than
    ``w_cfg.gptq_max_columns`` get none (they round to nearest; logged).
    """
    linear, other = [], []
    for name in float_layers(model):
        mod = model.get_submodule(name)
        if isinstance(mod, QLinear) and \
                mod.in_features <= w_cfg.gptq_max_columns:
            linear.append(name)
        else:
            other.append(name)
    if other:
        log(f'GPTQ rounding for {len(linear)} Linear layers; {len(other)} '
            'layers round to nearest (Conv2d, or Linear with more than '
            f'{w_cfg.gptq_max_columns} inputs): {", ".join(other[:4])}'
            f'{" ..." if len(other) > 4 else ""}')
    hs: Dict[str, torch.Tensor] = {}
    hooks = []
    for name in linear:
        def hook(mod, args, name=name):
            hs[name] = hessian_update(
                hs.get(name), integer_layer_input(mod, args[0], w_cfg), name)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches():
                run(batch)
                del batch
    finally:
        for h in hooks:
            h.remove()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for name in linear:  # same order on every process
            if name not in hs:  # this process's batches never reached it
                k = model.get_submodule(name).in_features
                hs[name] = torch.zeros(k, k, dtype=torch.float64, device=next(
                    model.get_submodule(name).parameters()).device)
            all_reduce_(hs[name])
            if not bool(hs[name].any()):  # no process's batches reached it
                del hs[name]
    # kept on the CPU until their layer is converted (ViT-L: ~4 GB)
    hs = {k: v.cpu() for k, v in hs.items()}
    missing = [n for n in linear if n not in hs]
    if missing:
        log(f'GPTQ: no calibration input reached {", ".join(missing[:4])}'
            f'{" ..." if len(missing) > 4 else ""}; they round to nearest')
    return hs


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


_UNSET = object()
_MALLOC_TRIM = _UNSET


def release_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim(0)``).

    glibc keeps freed chunks resident; over many forward passes the freed
    temporaries land in ever other places of the heap, so without this the
    RSS grows with the number of batches although the live tensors do not.
    Costs the page faults of re-touching the released pages (about 10-15% of
    the CPU time of a QwT fit on DeiT-T).  Returns False (and does nothing)
    where the C library has no ``malloc_trim`` (musl, macOS, Windows).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is _UNSET:
        fn = None
        if sys.platform.startswith('linux'):
            fn = getattr(ctypes.CDLL(None), 'malloc_trim', None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _MALLOC_TRIM = fn
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def _consecutive(name: str, next_name: str) -> bool:
    """``next_name`` is the entry after ``name`` in the same block list."""
    head, _, idx = name.rpartition('.')
    nhead, _, nidx = next_name.rpartition('.')
    return head == nhead and idx.isdigit() and nidx.isdigit() and \
        int(nidx) == int(idx) + 1


def _chain_glue(model: nn.Module, name: str, next_name: str
                ) -> Optional[Callable]:
    """How block ``next_name``'s input follows from block ``name``'s output
    (``glue(out, args, kwargs) -> (args, kwargs)`` with ``name``'s inputs),
    or None where no rule is known (prefix forwards then).

    - The next entry of the same block list (a Swin stage's blocks, a ViT's
      layers): the output itself, the other arguments unchanged.
    - The last block of a Swin stage and the first of the next one (mmdet
      and mmpretrain ``SwinBlockSequence``: both apply ``stages[i]
      .downsample`` -- the patch merging, already integer -- to the last
      block's output on its ``hw_shape``, between the stages and nothing
      else): ``downsample(out, hw_shape)``.

    Neither is assumed: batch 0 of every block is also computed by a prefix
    forward and compared bit for bit (``weight_ptq``).
    """
    if _consecutive(name, next_name):
        return lambda out, args, kwargs: ((out, ) + tuple(args[1:]), kwargs)
    head, _, idx = name.rpartition('.')
    nhead, _, nidx = next_name.rpartition('.')
    if not (head.endswith('.blocks') and nhead.endswith('.blocks')
            and nidx == '0' and idx.isdigit()):
        return None
    stage, nstage = head[:-len('.blocks')], nhead[:-len('.blocks')]
    if not _consecutive(stage, nstage) or \
            int(idx) != len(model.get_submodule(head)) - 1:
        return None
    down = getattr(model.get_submodule(stage), 'downsample', None)

    def glue(out, args, kwargs):
        if down is None:
            return (out, ) + tuple(args[1:]), kwargs
        if len(args) < 2:  # hw_shape not positional: no rule
            return None
        x, hw_shape = down(out, args[1])
        return (x, hw_shape) + tuple(args[2:]), kwargs

    return glue


def _nbytes(obj) -> int:
    """Memory a cached input keeps alive (whole storages: a view keeps its
    base)."""
    if torch.is_tensor(obj):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _compact(obj):
    """``obj`` with every tensor that is a view into a larger storage copied
    out (``torch.save`` writes whole storages)."""
    if torch.is_tensor(obj):
        return obj.clone() if obj.untyped_storage().nbytes() > \
            obj.numel() * obj.element_size() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_compact(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    return obj


class _Spill:
    """A cached block input or output written to the spill directory (beyond
    the RAM budget); read back bit for bit, on the device it came from."""

    def __init__(self, obj, directory: str):
        fd, self.path = tempfile.mkstemp(suffix='.pt', dir=directory)
        os.close(fd)
        torch.save(_compact(obj), self.path)

    def load(self):
        # plain tensors, tuples of ints (hw_shape) and dicts: safe loading
        return torch.load(self.path, weights_only=True)

    def drop(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def _get(entry):
    return entry.load() if isinstance(entry, _Spill) else entry


def _drop(entry) -> None:
    if isinstance(entry, _Spill):
        entry.drop()


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and \
            a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and \
            all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and \
            all(_same(a[k], b[k]) for k in a)
    return a == b


def _storages(objs) -> set:
    out = set()
    for o in objs:
        if torch.is_tensor(o):
            out.add(o.untyped_storage().data_ptr())
        elif isinstance(o, (list, tuple)):
            out |= _storages(o)
        elif isinstance(o, dict):
            out |= _storages(o.values())
    return out


@torch.no_grad()
def weight_ptq(model: nn.Module,
               batches: Callable[[], Iterable],
               run: Callable[[object], None],
               w_cfg: WeightQuantConfig,
               qwt: bool = True,
               lam: float = 1e-2,
               use_learned_scale: bool = False,
               logger: Optional[Callable[[str], None]] = None,
               batch_ids: Optional[Sequence[int]] = None,
               progress: bool = False,
               cache_bytes: int = 2 * 2**30,
               spill_dir: Optional[str] = None,
               full_run: Optional[Callable[[object], None]] = None
               ) -> PTQReport:
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
        batch_ids: Global index of each batch ``batches()`` yields (default
            0, 1, 2, ...): batch ``g`` goes to the fit accumulator if ``g`` is
            even, to the held-out one if odd.  Under ``torch.distributed``
            pass the indices of this process's share of the global batches
            (``build_calib_loader(...).batch_sampler.global_ids``); the sums
            are all-reduced, so every process fits on all batches.
        progress: Show a progress bar (count, ETA) over the calibration
            batches of each QwT block (mmengine ``ProgressBar``, stdout).
        cache_bytes: Budget for block inputs kept between blocks (QwT).  A
            block's input is normally recomputed by a forward of the model up
            to the block (the "prefix"), so block ``b`` costs ``b`` block
            forwards per image on top of its own two.  Where the next block's
            input follows from this block's output by a known rule
            (``_chain_glue``: the next entry of the same block list -- the
            blocks of one Swin stage, all ViT layers -- or, across Swin
            stages, the stage's patch merging), the inputs of as many
            batches as fit in this budget are kept and the next block's
            inputs are the quantized block's outputs (computed anyway for
            the QwT target) plus the fitted compensation, through that rule
            -- or, for a batch whose output did not fit after the inputs,
            one forward of the finished block (checked once per block
            against the prefix forward, bit for bit; on a mismatch the
            prefixes are used).  Same results, fewer forwards; memory grows
            with the number of images up to this budget, then stays flat.
            0: no cache.
        spill_dir: Where block inputs and outputs that do not fit in
            ``cache_bytes`` are written (a temporary folder inside it, removed
            at the end, also on error) instead of being recomputed by prefix
            forwards.  At real size that is what keeps every image off the
            prefix forwards with flat memory: a 1333x800 Swin-T stage-0 input
            is ~26 MB, ~13 GB for 512 images.  None: no spilling.
        full_run: Runs the whole model on one batch (default ``run``): the
            forward that collects GPTQ's Hessians when ``w_cfg.rounding`` is
            ``'gptq'`` (:func:`collect_hessians`; not with
            ``use_learned_scale``, whose codes are the trained ones).
    """
    log = logger or (lambda msg: None)
    t0 = time.time()
    report = PTQReport()
    set_act_state(model, QState.FROZEN)
    model.eval()
    hessians: Dict[str, torch.Tensor] = {}
    if w_cfg.rounding == 'gptq' and not use_learned_scale:
        th = time.time()
        hessians = collect_hessians(model, batches, full_run or run, w_cfg, log)
        report.hessian_seconds = time.time() - th
        log(f'GPTQ: input Gram matrices of {len(hessians)} Linear layers '
            f'({sum(h.numel() * 8 for h in hessians.values()) / 2**20:.0f} MiB, '
            f'{report.hessian_seconds:.1f}s)')
    convert_outside_blocks(model, w_cfg, report, use_learned_scale, hessians)
    log(f'converted {len(report.layers)} layers outside transformer blocks')
    blocks = transformer_blocks(model)
    # float64 copies of QwTSums.update, shared by all blocks (reallocated
    # only where the width or the rows per batch grow)
    scratch = QwTScratch()
    # cache[i]: the current block's (args, kwargs) for local batch i, or
    # None (that batch runs the prefix forward); None: no cache
    cache: Optional[List] = None
    chain_ok = True  # False after a chained input differed from the model's
    report.forwards = dict(prefix=0, block=0, chained=0)
    spill = None if spill_dir is None else \
        tempfile.mkdtemp(prefix='gplq_qwt_', dir=spill_dir)
    try:
        for bi, (bname, block) in enumerate(blocks):
            tb = time.time()
            # everything this block keeps is allocated before its first batch:
            # its FP32 copy, its integer layers, its QwT sums
            fp_block = copy.deepcopy(block) if qwt else None
            for name in float_layers(model, bname):
                w = model.get_submodule(name).weight
                new = convert_layer(model, name, w_cfg, use_learned_scale,
                                    hessians.pop(name, None))
                report.layers.append(LayerReport(name, list(w.shape),
                                                 _rel_error(new, w)))
            if not qwt:
                continue
            width = block_width(block)
            sums = None if width is None else \
                [QwTSums(width, width, scratch), QwTSums(width, width, scratch)]
            release_heap()  # the previous block's garbage and conversion temps
            i = -1
            glue = None if bi + 1 == len(blocks) else \
                _chain_glue(model, bname, blocks[bi + 1][0])
            chain = glue is not None
            if cache is None and chain and chain_ok and \
                    (cache_bytes > 0 or spill is not None):
                cache, used = [], 0  # filled from the prefix forwards below
            # outs[i]: the quantized block's output on cached batch i, kept
            # (within the budget) so that the next block's input is
            # ``outs[i] + qwt(x)`` -- QwTMixin's forward -- without running the
            # block again
            outs: Dict[int, torch.Tensor] = {}
            extra = 0
            source = batches()
            bar = _progress_bar(source, f'QwT block {bi + 1}/{len(blocks)} '
                                f'{bname}', log) if progress else None
            for i, batch in enumerate(source):
                g = i if batch_ids is None else _global_id(batch_ids, i)
                cached = _get(cache[i]) if cache is not None and \
                    i < len(cache) else None
                if cached is None or i == 0:
                    args, kwargs = _block_inputs(model, block, run, batch)
                    report.forwards['prefix'] += 1
                    # batch 0: the chained inputs must be the model's own, bit
                    # for bit (its forward may do more between two blocks than
                    # passing the output on); if not, prefixes from here on
                    if cached is not None and not _same(cached, (args, kwargs)):
                        log(f'{bname}: the input computed from the previous '
                            "block differs from the model's forward; block "
                            'inputs are recomputed by prefix forwards from here')
                        for e in cache + list(outs.values()):
                            _drop(e)
                        cache, chain_ok = None, False
                else:
                    args, kwargs = cached
                if cache is not None and i == len(cache):  # first block of a chain
                    size = _nbytes((args, kwargs))
                    # inputs before outputs (an input saves a prefix forward, an
                    # output only a block forward): make room by dropping
                    # outputs from memory (to the spill directory if any)
                    ram = [k for k, v in outs.items()
                           if not isinstance(v, _Spill)]
                    while ram and used + extra + size > cache_bytes:
                        k = ram.pop()
                        out = outs.pop(k)
                        extra -= _nbytes(out)
                        if spill is not None:
                            outs[k] = _Spill(out, spill)
                        del out
                    # batch 0 first: it is the one that checks the chain
                    first = i == 0 or cache[0] is not None
                    keep = used + extra + size <= cache_bytes and first
                    cache.append((args, kwargs) if keep else
                                 _Spill((args, kwargs), spill)
                                 if first and spill is not None else None)
                    used += size if keep else 0
                del batch, cached
                x = args[0]
                # the prefix forward's temporaries are garbage now: hand their
                # pages back before the two block forwards (see release_heap)
                release_heap()
                res = fp_block(*args, **kwargs)
                y_q = block(*args, **kwargs)
                report.forwards['block'] += 2
                if cache is not None and chain and i < len(cache) and \
                        cache[i] is not None:
                    size = _nbytes(y_q)
                    if used + extra + size <= cache_bytes:
                        outs[i], extra = y_q, extra + size
                    elif spill is not None:
                        outs[i] = _Spill(y_q, spill)
                if res.untyped_storage().data_ptr() in _storages((args, kwargs)):
                    res = res - y_q  # the block returned (a view of) its input
                else:
                    res.sub_(y_q)  # Y_fp - Y_q, in the FP32 output's memory
                del y_q
                c_in, c_out = x.shape[-1], res.shape[-1]
                if sums is None or (sums[0].n == sums[1].n == 0 and
                                    (sums[0].in_dim, sums[0].out_dim) !=
                                    (c_in, c_out)):
                    sums = [QwTSums(c_in, c_out, scratch),
                            QwTSums(c_in, c_out, scratch)]
                sums[g % 2].update(x, res)  # even: fit, odd: held out
                del args, kwargs, x, res
                release_heap()  # ... and theirs before the next prefix forward
                if bar is not None:
                    bar.update()
            if bar is not None:
                bar.file.write('\n')
            if batch_ids is not None and i + 1 != len(batch_ids):
                raise ValueError(f'weight_ptq: batch_ids has {len(batch_ids)} '
                                 f'entries but batches() gave {i + 1} batches.')
            if sums is None:
                raise ValueError(f'QwT: no calibration batch reached {bname}; '
                                 'use at least one calibration image.')
            for s in sums:
                s.all_reduce()
            fit = fit_qwt(sums[0], sums[1], lam)
            if fit.kept:
                attach_qwt(block, fit.weight, fit.bias)
            if cache is not None and chain:
                # the next block's inputs: this (finished) block's outputs,
                # through the glue between the two blocks (_chain_glue)
                for j, entry in enumerate(cache):
                    if entry is None:
                        continue
                    c = _get(entry)
                    out = _get(outs.get(j))
                    _drop(outs.pop(j, None))
                    if out is None:
                        out = block(*c[0], **c[1])
                        report.forwards['chained'] += 1
                    elif fit.kept:  # QwTMixin.forward, its block part reused
                        out = out + block.qwt(c[0][0])
                    nxt = glue(out, *c)
                    del c, out
                    if isinstance(entry, _Spill):  # stays on disk
                        entry.drop()
                        nxt = None if nxt is None else _Spill(nxt, spill)
                    cache[j] = nxt
                    if nxt is None:  # the glue has no rule for these args
                        for e in cache + list(outs.values()):
                            _drop(e)
                        cache = None
                        break
                if cache is not None:  # the glue may change the sizes
                    used = sum(_nbytes(c) for c in cache if c is not None)
                release_heap()
            elif cache is not None:
                for e in cache:
                    _drop(e)
                cache = None  # the next block starts a new block list
            report.blocks.append(BlockReport(bname, fit.kept, fit.r2,
                                             fit.err_before, fit.err_after, fit.n,
                                             fit.exact, time.time() - tb))
            log(f'QwT block {bi + 1}/{len(blocks)} {bname}: '
                f'{"kept" if fit.kept else "skipped"}, held-out R2={fit.r2:+.3f} '
                f'({time.time() - tb:.1f}s)')
            del fp_block, sums, fit, outs
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    del scratch, cache
    release_heap()
    remaining = float_layers(model)
    if remaining:
        raise RuntimeError(f'layers left unconverted: {remaining[:5]}')
    report.seconds = time.time() - t0
    return report


def _progress_bar(batches, title: str, log: Callable[[str], None]):
    """An mmengine ``ProgressBar`` over ``batches`` (count and ETA when the
    number of batches is known), announced by a log line."""
    from mmengine.utils import ProgressBar
    total = len(batches) if hasattr(batches, '__len__') else 0
    log(f'{title}: {total or "?"} calibration batches')
    return ProgressBar(total)


def _global_id(batch_ids: Sequence[int], i: int) -> int:
    if i >= len(batch_ids):
        raise ValueError(f'weight_ptq: batches() gave more than the '
                         f'{len(batch_ids)} batches of batch_ids.')
    return int(batch_ids[i])


def integer_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (IntQLinear, IntQConv2d))}
