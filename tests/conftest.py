"""Session fixtures shared by tests/models and tests/engine.

The datasets are generated once per session by ``gplq_mm.demo.data`` and
their locations exported as ``GPLQ_TEST_SHAPES`` / ``GPLQ_TEST_CLS``, which
the configs in ``tests/configs`` read (and which subprocesses inherit).
"""
import os
import os.path as osp

# torch's default OpenMP pool spin-waits on small VMs: a detector step measured
# ~10x slower than with one thread.  Set before torch is imported; subprocesses
# (stock scripts) inherit it.  An explicit OMP_NUM_THREADS wins.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory):
    """8 train / 4 val images of the COCO-format "shapes" set, 64 px."""
    from gplq_mm.demo.data import make_shapes_coco
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_coco(str(root), 8, 4, 64, 0)
    mp = pytest.MonkeyPatch()
    mp.setenv('GPLQ_TEST_SHAPES', str(root) + osp.sep)
    yield str(root)
    mp.undo()


@pytest.fixture(scope='session')
def cls_root(tmp_path_factory):
    """16 train / 10 val images of a 10-class set (Fashion-MNIST if the
    Debian package is installed, else generated shapes)."""
    from gplq_mm.demo.data import make_classification
    root = tmp_path_factory.mktemp('cls')
    make_classification(str(root), 16, 10, seed=0)
    mp = pytest.MonkeyPatch()
    mp.setenv('GPLQ_TEST_CLS', str(root) + osp.sep)
    yield str(root)
    mp.undo()
