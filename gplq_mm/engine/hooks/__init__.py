from .calibration_hook import GPLQCalibrationHook
from .safe_checkpoint_hook import GPLQSafeCheckpointHook

__all__ = ['GPLQCalibrationHook', 'GPLQSafeCheckpointHook']
