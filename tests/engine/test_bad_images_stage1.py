"""Stage-1 calibration on bad images, through the stock ``tools/train.py``.

* An all-black image is valid data: calibrated on it alone (normalisation
  off, so the first quantizer sees exact zeros), every scale is finite and
  positive; an all-zero channel gets the fallback scale 1.0.
* An image with NaN stops calibration with one error naming the image (and
  the batch), before any checkpoint is written.
* NaN produced inside the model (here: a NaN weight in the FP32 checkpoint)
  is reported with the quantizer that saw it and the batch's images.
"""
import glob
import os.path as osp

import pytest
import torch

from gplq_mm.engine.input_check import NonFiniteInputError
from gplq_test_utils import (CONFIGS, DEIT_GPLQ, REPO, ckpt_scales,
                             copy_with_black_image, first_shuffled_index,
                             load_cfg, run_script, stock_script, tail, train,
                             train_images, write_nan_config)

PATCH_EMBED = 'model.backbone.patch_embed.projection.act_quant'


@pytest.mark.slow
def test_all_black_image_gives_positive_finite_scales(cls_root, deit_fp32,
                                                      tmp_path):
    # the image GPLQCalibrationHook's seeded loader (seed 0) takes first
    first = first_shuffled_index(len(train_images(cls_root)), seed=0)
    black = copy_with_black_image(cls_root, str(tmp_path / 'data'), first)
    work = str(tmp_path / 'work')
    proc = run_script([
        stock_script('mmpretrain', 'train'), osp.join(CONFIGS, DEIT_GPLQ),
        '--work-dir', work, '--cfg-options', f'load_from={deit_fp32[0]}',
        f'train_dataloader.dataset.data_root={tmp_path}/data/',
        'train_dataloader.batch_size=1',
        'custom_hooks.0.num_batches=1',  # scales from the black image only
        'model.mimic.num_batches=4',  # PCA basis: 4 images
        'data_preprocessor.mean=[0,0,0]', 'data_preprocessor.std=[1,1,1]',
        'optim_wrapper.optimizer.lr=0'  # the checkpoint keeps the calibration
    ], cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    out = proc.stdout + proc.stderr
    assert 'GPLQ: calibrated' in out and 'loss: nan' not in out
    scales = ckpt_scales(torch.load(osp.join(work, 'epoch_1.pth'),
                                    weights_only=True))
    assert scales
    for name, s in scales.items():
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), name
    # the patch embedding saw only zeros: fallback scale, not 0/NaN
    torch.testing.assert_close(scales[PATCH_EMBED], torch.ones(3))
    # ... and the test is about that image (the data copy has it black)
    import cv2
    assert cv2.imread(black).max() == 0


@pytest.mark.slow
def test_nan_image_stops_calibration_naming_the_image(cls_root, deit_fp32,
                                                      tmp_path):
    bad = train_images(cls_root)[5]
    suffix = osp.join(*bad.split(osp.sep)[-2:])
    cfg = write_nan_config(tmp_path, DEIT_GPLQ, suffix)
    work = tmp_path / 'work'
    proc = run_script([
        stock_script('mmpretrain', 'train'), cfg, '--work-dir', str(work),
        '--cfg-options', f'load_from={deit_fp32[0]}',
        'custom_hooks.0.num_batches=4'  # all 16 images
    ], cwd=REPO, env={'PYTHONPATH': str(tmp_path)})
    assert proc.returncode != 0, tail(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('gplq_mm.engine.input_check.NonFiniteInputError: '
                           'GPLQ calibration, batch '), tail(proc)
    assert 'the preprocessed input of 1 image(s) contains NaN or inf: ' \
        f'{bad}.' in last
    assert 'std must be > 0' in last  # ... and what to check
    assert not glob.glob(str(work / '**' / '*.pth'), recursive=True)
    assert 'GPLQ: calibrated' not in proc.stdout + proc.stderr


def test_nan_inside_the_model_names_the_quantizer(deit_fp32, tmp_path):
    sd = torch.load(deit_fp32[0], weights_only=True)['state_dict']
    key = 'backbone.layers.0.ffn.layers.0.0.weight'
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float('nan')
    bad = str(tmp_path / 'nan_fp32.pth')
    torch.save({'state_dict': sd, 'meta': {}}, bad)
    cfg = load_cfg(DEIT_GPLQ, tmp_path / 'work', load_from=bad)
    with pytest.raises(NonFiniteInputError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith('GPLQ calibration, batch 1 (images: ')
    # the first quantizer after the NaN weight: the input of the FFN's
    # second Linear
    assert 'backbone.layers.0.ffn.layers.1.act_quant: calibration input ' \
        'contains NaN or inf' in msg, msg
    assert not glob.glob(str(tmp_path / 'work' / '**' / '*.pth'),
                         recursive=True)
