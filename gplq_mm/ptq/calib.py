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


def build_calib_loader(cfg, num_images: int, batch_size: int, seed: int,
                       pipeline: str = 'test') -> DataLoader:
    """Loader over a seeded subset of the config's training set.

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
    if num_images < world:  # a rank without batches would stall the all-reduce
        raise ValueError(f'--calib-images {num_images} is smaller than the '
                         f'number of processes ({world}): pass at least '
                         f'{world}.')
    idx = idx[rank::world]
    collate = cfg.train_dataloader.get('collate_fn',
                                       dict(type='pseudo_collate'))
    collate_fn = FUNCTIONS.get(collate['type'])
    return DataLoader(Subset(dataset, idx), batch_size=batch_size,
                      shuffle=False, num_workers=0, collate_fn=collate_fn)


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
