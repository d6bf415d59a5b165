"""Stage 2 (weight PTQ + QwT) and the RepQ-ViT-style PTQ baseline."""
from .convert import (attach_qwt, build_w4a4_structure, convert_layer,
                      transformer_blocks)
from .weight_ptq import PTQReport, weight_ptq

__all__ = [
    'attach_qwt', 'build_w4a4_structure', 'convert_layer',
    'transformer_blocks', 'PTQReport', 'weight_ptq'
]
