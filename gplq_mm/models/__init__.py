"""OpenMMLab model side: quantizer injection, the GPLQModel wrapper, mimic."""
from .gplq_model import CheckpointMismatchError, GPLQModel
from .injection import InjectConfig, inject

__all__ = ['GPLQModel', 'CheckpointMismatchError', 'InjectConfig', 'inject']
