"""OpenMMLab engine pieces: hooks and checkpoint safety."""
from .hooks import (GPLQCalibrationHook, GPLQExactResumeHook,
                    GPLQSafeCheckpointHook)
from .safe_checkpoint import (UnsafeCheckpointError, from_safe,
                              load_checkpoint_file, to_safe)

__all__ = [
    'GPLQCalibrationHook', 'GPLQExactResumeHook', 'GPLQSafeCheckpointHook',
    'UnsafeCheckpointError',
    'from_safe', 'load_checkpoint_file', 'to_safe'
]
