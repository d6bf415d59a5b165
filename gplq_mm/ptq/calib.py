"""Activation calibration, written once, and its data.

:class:`ActCalibration` is the one calibration procedure of the library: the
stage-1 hook (``GPLQCalibrationHook``), stage 2's RepQ-ViT-style baseline
(``gplq_quantize.py --method repq``, via :func:`calibrate_activations`) and
``tools/benchmark.py`` all run it.  It works on any module holding quantizers
(the :mod:`gplq_mm.quant` helpers find them), not on ``GPLQModel``.
:func:`build_calib_loader` draws stage 2's seeded calibration subset.
"""
import copy
import time
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.registry import DATASETS, FUNCTIONS
from torch import nn
from torch.utils.data import DataLoader, Subset

from gplq_mm.quant import (QConv2d, QLinear, QState, QuantConfig,
                           iter_act_quantizers, iter_weight_quantizers,
                           set_act_state)


def _innermost(ds_cfg):
    """Unwrap RepeatDataset/ClassBalancedDataset-style wrappers."""
    while 'dataset' in ds_cfg and 'pipeline' not in ds_cfg:
        ds_cfg = ds_cfg['dataset']
    return ds_cfg


def calibration_indices(dataset_len: int, num_images: int, seed: int) -> List[int]:
    """Deterministic sample of ``num_images`` distinct training indices."""
    if num_images < 1:
        raise ValueError(f'--calib-images {num_images}: use at least 1 '
                         'calibration image (the paper uses 512).')
    if num_images > dataset_len:
        raise ValueError(
            f'--calib-images {num_images} is larger than the training set '
            f'({dataset_len} images): pass --calib-images {dataset_len} or '
            'fewer.')
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(dataset_len, num_images, replace=False).tolist())


class CalibBatchSampler:
    """Global batches of the calibration subset, this process's share.

    The subset is cut into consecutive batches of ``batch_size`` (the last
    one may be smaller): global batch ``g`` holds subset positions
    ``[g * batch_size, (g + 1) * batch_size)`` and goes to rank
    ``g % world_size``.  One process therefore sees the same batches (same
    images together, same padding) as any number of processes together, and
    ``global_ids`` tells stage 2 which global batches this process holds
    (QwT holds out the odd ones).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f'--batch-size {batch_size}: use at least 1.')
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.num_global = -(-num_samples // batch_size)
        if self.num_global < world_size:
            raise ValueError(
                f'--calib-images {num_samples} with --batch-size {batch_size} '
                f'gives {self.num_global} calibration batch(es), fewer than '
                f'the {world_size} processes (a process without batches would '
                f'stall the all-reduce): pass --calib-images '
                f'{world_size * batch_size} or more, or a smaller --batch-size.')
        self.global_ids = list(range(rank, self.num_global, world_size))

    def __iter__(self):
        for g in self.global_ids:
            start = g * self.batch_size
            yield list(range(start, min(start + self.batch_size,
                                        self.num_samples)))

    def __len__(self) -> int:
        return len(self.global_ids)


def build_calib_loader(cfg, num_images: int, batch_size: int, seed: int,
                       pipeline: str = 'test') -> DataLoader:
    """Loader over a seeded subset of the config's training set.

    Under ``torch.distributed`` each process loads whole batches of the
    subset (:class:`CalibBatchSampler`: global batch ``g`` on rank
    ``g % world_size``; ``loader.batch_sampler.global_ids`` lists them).

    Args:
        cfg: The mmengine Config (default scope already set).
        num_images: Calibration images in total (split across ranks).
        batch_size: Images per batch.
        seed: Seed of the subset.
        pipeline: ``test`` (the config's deterministic test pipeline, default)
            or ``train`` (the training pipeline, random augmentation included).
    """
    ds_cfg = copy.deepcopy(_innermost(cfg.train_dataloader.dataset))
    if pipeline == 'test':
        test_ds = _innermost((cfg.get('test_dataloader') or
                              cfg.val_dataloader).dataset)
        ds_cfg.pipeline = copy.deepcopy(test_ds.pipeline)
    elif pipeline != 'train':
        raise ValueError(f'pipeline={pipeline!r}: use "test" or "train".')
    dataset = DATASETS.build(ds_cfg)
    idx = calibration_indices(len(dataset), num_images, seed)
    rank, world = get_dist_info()
    sampler = CalibBatchSampler(len(idx), batch_size, rank, world)
    collate = cfg.train_dataloader.get('collate_fn',
                                       dict(type='pseudo_collate'))
    collate_fn = FUNCTIONS.get(collate['type'])
    return DataLoader(Subset(dataset, idx), batch_sampler=sampler,
                      num_workers=0, collate_fn=collate_fn)


def override_observers(model: nn.Module, observer: str,
                       percentile=(0.1, 99.9)) -> None:
    """Set the calibration observer of every uniform activation quantizer."""
    for _, q in iter_act_quantizers(model):
        if q.cfg.kind == 'uniform':
            q.cfg = QuantConfig(**{**q.cfg.to_dict(), 'observer': observer,
                                   'percentile': tuple(percentile)})


def search_folded_weight_scales(model: nn.Module) -> int:
    """(Re)search the weight scale of every fake-quantized weight on its
    folded weight ``W diag(t)`` (direct-QAT baseline; ``t``: the part of the
    activation scale its ``fold`` folds): only meaningful once the
    activation scales are calibrated.  Returns the count."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (QLinear, QConv2d)) and m.weight_quant is not None:
            m.weight_quant.initialized.fill_(False)
            m.quantized_weight()
            n += 1
    return n


class ActCalibration:
    """PTQ calibration of the activation quantizers of ``model``.

    ``begin()`` lets every activation quantizer observe (state
    ``CALIBRATING``); the caller then runs forwards; ``end(state)`` turns the
    observed statistics into scales (all-reduced under torch.distributed),
    puts the quantizers into ``state`` and, with ``search_weights``, searches
    the weight scales on the folded weights.  :meth:`run` does all of it over
    an iterable of batches.  ``pause()``: stop observing (forwards that
    follow leave the statistics alone, e.g. extra PCA-teacher batches).

    Args:
        model: Any module holding quantizers (e.g. ``GPLQModel`` or the
            model it wraps).
        search_weights: Forget the weight quantizers' scales in ``begin``
            and search them again on the folded weights in ``end``.
    """

    def __init__(self, model: nn.Module, search_weights: bool = False):
        self.model = model
        self.search_weights = search_weights

    def begin(self) -> None:
        set_act_state(self.model, QState.CALIBRATING)
        if self.search_weights:
            for _, wq in iter_weight_quantizers(self.model):
                wq.initialized.fill_(False)  # (re)search on the loaded weights

    def pause(self) -> None:
        set_act_state(self.model, QState.OFF)

    @torch.no_grad()
    def end(self, state=QState.LEARNING) -> None:
        for _, q in iter_act_quantizers(self.model):
            if q.observer is not None:
                q.finish_calibration()
        set_act_state(self.model, state)
        if self.search_weights:
            search_folded_weight_scales(self.model)

    @torch.no_grad()
    def run(self, batches: Iterable, forward: Callable,
            state=QState.LEARNING,
            log: Optional[Callable[[str], None]] = None,
            progress: bool = False) -> int:
        """``begin``, ``forward(batch)`` for every batch, ``end(state)``;
        returns the number of batches.  ``progress``: an mmengine
        ``ProgressBar`` (count, ETA) instead of a log line per batch."""
        log = log or (lambda m: None)
        self.begin()
        t0, n = time.time(), 0
        total = len(batches) if hasattr(batches, '__len__') else '?'
        bar = None
        if progress:
            from mmengine.utils import ProgressBar
            log(f'activation calibration: {total} batches')
            bar = ProgressBar(total if isinstance(total, int) else 0)
        for i, batch in enumerate(batches):
            forward(batch)
            n = i + 1
            if bar is not None:
                bar.update()
            else:
                log(f'activation calibration: batch {n}/{total} '
                    f'({time.time() - t0:.1f}s)')
        if bar is not None:
            bar.file.write('\n')
        self.end(state)
        log(f'activation calibration: {n} batches in {time.time() - t0:.1f}s')
        return n


def calibrate_activations(model: nn.Module, loader, run: Callable,
                          log: Optional[Callable[[str], None]] = None,
                          state=QState.FROZEN, progress: bool = False) -> int:
    """PTQ calibration of every activation quantizer (FP32 upstream), in
    eval mode, ending in ``state`` (RepQ-ViT-style baseline)."""
    model.eval()
    return ActCalibration(model).run(loader, run, state, log, progress)
