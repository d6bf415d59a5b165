"""Stage 2 (weight PTQ + QwT, the W4A4 export), the activation calibration
and the RepQ-ViT-style PTQ baseline."""
from .calib import ActCalibration, calibrate_activations
from .convert import (attach_qwt, build_w4a4_structure, convert_layer,
                      transformer_blocks)
from .export import Stage2Error, Stage2Options, write_w4a4
from .weight_ptq import PTQReport, weight_ptq

__all__ = [
    'attach_qwt', 'build_w4a4_structure', 'convert_layer',
    'transformer_blocks', 'PTQReport', 'weight_ptq', 'ActCalibration',
    'calibrate_activations', 'Stage2Error', 'Stage2Options',
    'write_w4a4'
]
