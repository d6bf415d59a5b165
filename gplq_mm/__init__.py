"""gplq_mm: GPLQ (activation-first, weights-later W4A4 QAT) for mmdet and mmpretrain.

``custom_imports = dict(imports=['gplq_mm'])`` registers ``GPLQModel`` and the
hooks in mmengine's root registries (so mmdet and mmpretrain configs both find
them).  The quantization core ``gplq_mm.quant`` imports torch only; the
OpenMMLab side is imported only when mmengine is installed.
"""
from importlib.util import find_spec

from .version import __version__

if find_spec('mmengine') is not None:
    from . import engine, models  # noqa: F401  (registers modules)

__all__ = ['__version__']
