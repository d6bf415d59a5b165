"""Small, real, deterministic datasets for the gplq_mm demo and CI.

Nothing here imports torch: the generators only need numpy, OpenCV, Pillow and
pycocotools, so they are cheap to import from tests and command-line tools.
"""
from .data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR,
                   GENERATED_CLS_CLASSES, SHAPES_CLASSES,
                   fashion_mnist_available, make_classification,
                   make_shapes_coco)

__all__ = [
    'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'GENERATED_CLS_CLASSES',
    'SHAPES_CLASSES', 'fashion_mnist_available', 'make_classification',
    'make_shapes_coco'
]
