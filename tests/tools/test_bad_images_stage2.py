"""``tools/gplq_quantize.py`` on bad calibration images.

* An all-black image (normalisation off: the first quantizer sees exact
  zeros) is valid: ``--method repq`` calibrates on it alone and writes a
  W4A4 checkpoint whose tensors are all finite, with positive scales.
* An image with NaN: one ``gplq_quantize: error:`` line naming the image, and
  --out-dir is left as it was (``--method gplq``: during the QwT/weight
  pass; ``--method repq``: during activation calibration).
"""
import os
import os.path as osp

import pytest
import torch
from gplq_test_utils import (DEIT_FP32, DEIT_GPLQ, REPO,
                             copy_with_black_image, run_script, tail,
                             train_images, write_nan_config)

TOOL = osp.join(REPO, 'tools', 'gplq_quantize.py')


@pytest.mark.slow
def test_all_black_image_gives_finite_w4a4(runs, arch, cls_root, tmp_path):
    a = arch['cls']
    copy_with_black_image(cls_root, str(tmp_path / 'data'), 0)
    out = tmp_path / 'out'
    proc = runs.quantize(
        a.plain_cfg, a.fp32_ckpt, '--method', 'repq', '--out-dir', out,
        '--calib-images', 1, '--batch-size', 1, '--name', 'black',
        '--cfg-options',
        f'train_dataloader.dataset.data_root={tmp_path}/data/',
        'train_dataloader.dataset.indices=[0]',  # the black image only
        'data_preprocessor.mean=[0,0,0]', 'data_preprocessor.std=[1,1,1]',
        cwd=tmp_path)
    assert proc.returncode == 0, tail(proc)
    ck = torch.load(str(out / 'black_w4a4.pth'), weights_only=True)
    assert ck['meta']['gplq']['calib_images'] == 1
    sd = ck['state_dict']
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    assert floats and all(bool(torch.isfinite(v).all())
                          for v in floats.values())
    scales = {k: v for k, v in floats.items() if k.endswith('.scale')}
    assert len(scales) > 10
    assert all(bool((v > 0).all()) for v in scales.values())
    # the patch embedding's input was all zeros: the fallback scale 1.0
    torch.testing.assert_close(
        sd['model.backbone.patch_embed.projection.act_quant.scale'],
        torch.ones(3))


@pytest.mark.parametrize('method', ['gplq', 'repq'])
def test_nan_image_fails_naming_it(method, arch, cls_root, tmp_path):
    a = arch['cls']
    bad = train_images(cls_root)[5]
    suffix = osp.join(*bad.split(osp.sep)[-2:])
    base, ckpt = (DEIT_GPLQ, a.w32a4_ckpt) if method == 'gplq' else \
        (DEIT_FP32, a.fp32_ckpt)
    cfg = write_nan_config(tmp_path, base, suffix)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('pre-existing')
    proc = run_script([TOOL, cfg, ckpt, '--method', method, '--out-dir',
                       str(out), '--calib-images', '16'], cwd=str(tmp_path),
                      env={'PYTHONPATH': str(tmp_path)})
    assert proc.returncode != 0, tail(proc)
    assert 'Traceback' not in proc.stderr, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert len(msg) == 1, tail(proc)
    assert ('calibration: the preprocessed input of 1 image(s) contains NaN '
            f'or inf: {bad}.') in msg[0]
    assert 'std must be > 0' in msg[0] and msg[0].endswith(
        'Nothing was written.')
    assert sorted(os.listdir(out)) == ['keep.txt']
