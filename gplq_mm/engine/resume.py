"""Exact ``--resume`` of stage-1 runs (used by ``GPLQExactResumeHook``).

mmengine 0.10 leaves two gaps that matter for a one-epoch Act-QAT run:

* ``EpochBasedTrainLoop`` resumed from a checkpoint saved *inside* an epoch
  (``CheckpointHook(by_epoch=False, interval=N)``) restarts that epoch at its
  first batch: the batches trained before the checkpoint are trained again
  and the run ends with ``K + len(dataloader)`` iterations instead of
  ``len(dataloader)``.  :func:`skipping_loader` gives the resumed epoch a
  loader over the same batch sampler that drops the first ``K`` batches
  without loading them (the sampler's order is a function of seed and epoch,
  so the remaining batches are exactly those of the uninterrupted epoch).
* checkpoints hold the seed but not the RNG states, so drop-path masks (and,
  with ``num_workers=0``, random augmentations) after a resume differ from an
  uninterrupted run.  :func:`rng_state` / :func:`set_rng_state` save and
  restore torch (CPU and current CUDA device), numpy and ``random``.
"""
import itertools
import random
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

RNG_KEY = 'gplq_rng'


def rng_state() -> dict:
    """The global RNG states, as tensors and plain Python values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = dict(torch=torch.get_rng_state(),
               numpy=dict(name=name,
                          keys=torch.from_numpy(keys.astype(np.int64)),
                          pos=int(pos), has_gauss=int(has_gauss),
                          cached_gaussian=float(gauss)),
               python=dict(version=version, state=list(state),
                           gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['cuda'] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32),
                         n['pos'], n['has_gauss'], n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(p['state']), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


class SkipBatches:
    """Batch sampler: ``inner`` without its first ``skip`` batches.

    Only indices are skipped (no image is loaded).  ``on_start`` runs when
    the first kept batch is requested, i.e. after the DataLoader iterator
    was created and before any kept batch is loaded.
    """

    def __init__(self, inner, skip: int,
                 on_start: Optional[Callable[[], None]] = None):
        self.inner, self.skip, self.on_start = inner, skip, on_start

    def __iter__(self):
        it = itertools.islice(iter(self.inner), self.skip, None)
        if self.on_start is not None:
            self.on_start()
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def skipping_loader(loader: DataLoader, skip: int,
                    on_start: Optional[Callable[[], None]] = None
                    ) -> DataLoader:
    """A DataLoader like ``loader`` whose iteration drops ``skip`` batches.

    Same dataset, batch sampler (hence sampler and its epoch), collate
    function, workers and worker seeding; meant for one epoch.
    """
    kwargs = dict(num_workers=loader.num_workers,
                  collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn,
                  generator=loader.generator)
    if loader.num_workers > 0:
        kwargs.update(multiprocessing_context=loader.multiprocessing_context,
                      prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset,
                      batch_sampler=SkipBatches(loader.batch_sampler, skip,
                                                on_start),
                      **kwargs)
