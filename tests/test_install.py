"""The installed stack is the one tools/install.sh promises, and it runs."""
import torch


def test_versions_match_readme():
    import mmcv
    import mmdet
    import mmengine
    import mmpretrain
    import torchvision
    assert torch.__version__.split('+')[0] == '2.14.1'
    assert torchvision.__version__.split('+')[0] == '0.29.1'
    assert mmcv.__version__ == '2.1.0'
    assert mmengine.__version__ == '0.10.7'
    assert mmdet.__version__ == '3.3.0'
    assert mmpretrain.__version__ == '1.2.0'


def test_mmcv_compiled_ops_run():
    from mmcv.ops import RoIAlign, nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]  # the overlapping lower-score box is gone
    feat = torch.arange(16.).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 4., 4.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(
        feat, rois)
    assert out.shape == (1, 1, 2, 2)
    # mean of each 2x2 quadrant of the 4x4 ramp
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.5, 4.5],
                                                        [10.5, 12.5]]))


def test_openmmlab_registries_see_gplq():
    import gplq_mm  # noqa: F401
    from mmengine.registry import HOOKS, MODELS
    from mmdet.registry import MODELS as DET_MODELS
    from mmpretrain.registry import MODELS as CLS_MODELS
    assert MODELS.get('GPLQModel') is not None
    assert HOOKS.get('GPLQCalibrationHook') is not None
    # reachable from both downstream scopes (through the root registry)
    assert DET_MODELS.get('GPLQModel') is MODELS.get('GPLQModel')
    assert CLS_MODELS.get('GPLQModel') is MODELS.get('GPLQModel')
