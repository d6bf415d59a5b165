"""Calibration data for stage 2 and activation PTQ (RepQ-ViT-style baseline)."""
import copy
import time
from typing import Callable, List, Optional

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.registry import DATASETS, FUNCTIONS
from torch.utils.data import DataLoader, Subset

from gplq_mm.quant import QState, QuantConfig


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


def override_observers(gplq_model, observer: str,
                       percentile=(0.1, 99.9)) -> None:
    """Set the calibration observer of every uniform activation quantizer."""
    for _, q in gplq_model.act_quantizers():
        if q.cfg.kind == 'uniform':
            q.cfg = QuantConfig(**{**q.cfg.to_dict(), 'observer': observer,
                                   'percentile': tuple(percentile)})


@torch.no_grad()
def calibrate_activations(gplq_model, loader, run: Callable,
                          log: Optional[Callable[[str], None]] = None) -> int:
    """PTQ calibration of every activation quantizer (FP32 upstream)."""
    log = log or (lambda m: None)
    gplq_model.eval()
    gplq_model.set_quant_state(QState.CALIBRATING)
    t0, n = time.time(), 0
    for i, batch in enumerate(loader):
        run(batch)
        n = i + 1
        log(f'activation calibration: batch {n}/{len(loader)} '
            f'({time.time() - t0:.1f}s)')
    for _, q in gplq_model.act_quantizers():
        q.finish_calibration()
    gplq_model.set_quant_state(QState.FROZEN)
    return n
