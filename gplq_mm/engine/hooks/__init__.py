from .calibration_hook import GPLQCalibrationHook
from .drift_hook import GPLQDriftHook
from .exact_resume_hook import GPLQExactResumeHook
from .safe_checkpoint_hook import GPLQSafeCheckpointHook

__all__ = [
    'GPLQCalibrationHook', 'GPLQDriftHook', 'GPLQExactResumeHook',
    'GPLQSafeCheckpointHook'
]
