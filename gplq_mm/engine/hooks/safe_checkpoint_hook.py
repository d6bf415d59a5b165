"""Write checkpoints that the stock test scripts load with weights_only=True."""
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from gplq_mm.engine.safe_checkpoint import from_safe, to_safe


@HOOKS.register_module()
class GPLQSafeCheckpointHook(Hook):
    """Store only tensors and plain Python values in checkpoints.

    ``before_save_checkpoint`` converts mmengine objects (``HistoryBuffer``,
    numpy arrays/scalars) with :func:`~gplq_mm.engine.safe_checkpoint.to_safe`;
    ``after_load_checkpoint`` converts them back, before the Runner restores
    the message hub on ``--resume``.  Priority ``VERY_LOW`` so it sees what
    every other hook added to the checkpoint.

    Exact ``--resume`` (RNG states, skipping already-trained batches) is the
    job of :class:`~gplq_mm.engine.hooks.GPLQExactResumeHook`.
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # mostly the message hub (HistoryBuffer, numpy); the rest is checked
        for key in list(checkpoint):
            checkpoint[key] = to_safe(checkpoint[key], key)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in list(checkpoint):
            checkpoint[key] = from_safe(checkpoint[key])
