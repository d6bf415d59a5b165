"""Make ``--resume`` continue exactly where the run stopped."""
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from gplq_mm.engine.resume import (RNG_KEY, rng_state, set_rng_state,
                                   skipping_loader)


@HOOKS.register_module()
class GPLQExactResumeHook(Hook):
    """A resumed run ends as the uninterrupted run would have (see
    :mod:`gplq_mm.engine.resume`):

    * checkpoints also hold the RNG states (key ``gplq_rng``: torch CPU and
      current CUDA device, numpy, ``random``), restored where the
      uninterrupted run would have drawn its next random number;
    * a run resumed from a checkpoint saved inside an epoch (a by-iteration
      ``CheckpointHook``) skips the batches of that epoch that were trained
      before the checkpoint, instead of mmengine's restart of the epoch.

    Under DDP the checkpoint holds rank 0's RNG state (mmengine saves on rank
    0 only); it is restored on every rank unless ``randomness.diff_rank_seed``
    is set (then ranks draw differently anyway and nothing is restored).

    The stage-1 configs register it as ``default_hooks.exact_resume``.
    Priority ``LOW``: it adds its key to a checkpoint before
    ``GPLQSafeCheckpointHook`` (``VERY_LOW``) converts and checks the whole
    checkpoint.
    """

    priority = 'LOW'

    def __init__(self):
        self._resumed = False  # set by a --resume load, consumed once
        self._rng = None
        self._loader = None  # the train loader replaced for one epoch

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return
        self._resumed = True
        self._rng = checkpoint.get(RNG_KEY)
        if self._rng is not None and get_world_size() > 1 and \
                (runner.cfg.get('randomness') or {}).get('diff_rank_seed'):
            runner.logger.info('GPLQ resume: randomness.diff_rank_seed '
                               'is set; RNG states are not restored.')
            self._rng = None

    def _restore_rng(self, runner, where: str) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)
            runner.logger.info(f'GPLQ resume: restored the RNG states of '
                               f'the checkpoint ({where}).')
        self._rng = None

    def before_train_epoch(self, runner) -> None:
        if not self._resumed:
            return
        loop = runner.train_loop
        if not isinstance(loop, EpochBasedTrainLoop):
            return  # iteration-based loops skip trained batches themselves
        self._resumed = False
        n = len(loop.dataloader)
        skip = runner.iter - runner.epoch * n
        if skip == 0:  # resumed at an epoch boundary
            self._restore_rng(runner, 'start of the epoch')
            return
        if not 0 < skip <= n:
            runner.logger.warning(
                f'GPLQ resume: iteration {runner.iter} is not inside epoch '
                f'{runner.epoch + 1} ({n} batches per epoch, did the batch '
                'size or dataset change?); the epoch is trained from its '
                'first batch.')
            self._rng = None
            return
        runner.logger.info(
            f'GPLQ resume: checkpoint saved after batch {skip}/{n} of epoch '
            f'{runner.epoch + 1}; skipping those {skip} batches (mmengine '
            'would train them again).')
        self._loader = loop.dataloader
        loop.dataloader = skipping_loader(
            self._loader, skip,
            lambda: self._restore_rng(runner, f'batch {skip + 1}'))

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        if self._resumed:  # iteration-based loop: restore before the step
            self._resumed = False
            self._restore_rng(runner, f'iteration {runner.iter + 1}')

    def after_train_epoch(self, runner) -> None:
        if self._loader is not None:
            runner.train_loop.dataloader = self._loader
            self._loader = None
