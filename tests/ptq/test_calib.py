"""Calibration subset of stage 2 (and the PTQ baseline's activation scales)."""
import pytest
import torch

from gplq_mm.ptq.calib import (build_calib_loader, calibrate_activations,
                               calibration_indices, override_observers)
from gplq_mm.quant import iter_act_quantizers


def test_indices_deterministic_distinct_sorted():
    a = calibration_indices(100, 10, seed=3)
    assert a == calibration_indices(100, 10, seed=3)
    assert a == sorted(set(a)) and len(a) == 10
    assert all(0 <= i < 100 for i in a)
    assert any(calibration_indices(100, 10, seed=s) != a for s in range(4, 8))
    assert calibration_indices(7, 7, seed=0) == list(range(7))  # all of it


@pytest.mark.parametrize('num,match', [
    (0, r'--calib-images 0: use at least 1'),
    (-2, r'--calib-images -2: use at least 1'),
    (11, r'--calib-images 11 is larger than the training set \(10 images\): '
     r'pass --calib-images 10 or fewer'),
])
def test_indices_bad_count(num, match):
    with pytest.raises(ValueError, match=match):
        calibration_indices(10, num, seed=0)


def img_paths(loader):
    return [s.img_path if hasattr(s, 'img_path') else s.metainfo['img_path']
            for batch in loader for s in batch['data_samples']]


@pytest.mark.parametrize('case', ['det_case', 'cls_case'])
def test_loader_subset_is_seeded(request, case):
    cfg = request.getfixturevalue(case).cfg
    a = build_calib_loader(cfg, 3, 2, seed=1)
    assert len(a.dataset) == 3 and len(a) == 2
    paths = img_paths(a)
    assert paths == img_paths(build_calib_loader(cfg, 3, 1, seed=1))
    n = len(a.dataset.dataset)
    assert a.dataset.indices == calibration_indices(n, 3, 1)
    assert any(img_paths(build_calib_loader(cfg, 3, 2, seed=s)) != paths
               for s in range(2, 6))
    with pytest.raises(ValueError, match='larger than the training set'):
        build_calib_loader(cfg, n + 1, 2, seed=0)
    with pytest.raises(ValueError, match='at least 1'):
        build_calib_loader(cfg, 0, 2, seed=0)


def test_test_pipeline_is_deterministic(det_case):
    """The default calibration pipeline is the test pipeline (no random
    augmentation): the same image gives the same tensor twice."""
    l1 = build_calib_loader(det_case.cfg, 2, 2, seed=0)
    l2 = build_calib_loader(det_case.cfg, 2, 2, seed=0)
    for b1, b2 in zip(l1, l2):
        for x, y in zip(b1['inputs'], b2['inputs']):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match='use "test" or "train"'):
        build_calib_loader(det_case.cfg, 2, 2, 0, pipeline='val')


def test_ptq_calibration_sets_every_scale(cls_case, make_model):
    """RepQ-ViT-style baseline: every activation quantizer gets a scale."""
    model = make_model(cls_case.cfg)
    assert not model.all_calibrated()
    override_observers(model, 'percentile')
    n = calibrate_activations(
        model, cls_case.batches,
        lambda b: model(**model.data_preprocessor(b, False), mode='tensor'))
    assert n == len(cls_case.batches)
    assert model.all_calibrated()
    for _, q in iter_act_quantizers(model):
        assert bool(torch.isfinite(q.scale).all() and (q.scale > 0).all())
