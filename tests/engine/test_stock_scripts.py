"""Round trips through the stock OpenMMLab scripts, exactly as a user runs
them: ``tools/train.py`` on a stage-1 config writes the W32A4 checkpoint,
``tools/test.py`` with the same config evaluates it, and its printed metrics
and dumped predictions equal an in-process ``Runner.test()``."""
import os.path as osp

import mmengine
import pytest
import torch
from mmengine.runner import Runner

from gplq_test_utils import (CONFIGS, DEIT_GPLQ, DET_GPLQ, REPO, ckpt_scales,
                             last_metrics, load_cfg, read_json, run_script,
                             stock_script, tail)


def _stock_train(pkg, cfg_name, fp32, work):
    proc = run_script([stock_script(pkg, 'train'),
                       osp.join(CONFIGS, cfg_name), '--work-dir', work,
                       '--cfg-options', f'load_from={fp32}'], cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    out = proc.stdout + proc.stderr
    assert 'GPLQ: calibrated' in out and 'GPLQ calibration done' in out
    ckpt = osp.join(work, 'epoch_1.pth')
    assert osp.isfile(ckpt), tail(proc)
    ck = torch.load(ckpt, weights_only=True)  # the W32A4 checkpoint
    scales = ckpt_scales(ck)
    assert scales and all(bool((s > 0).all()) for s in scales.values())
    return ckpt


@pytest.mark.slow
def test_mmdet_train_then_test_matches_in_process(det_fp32, tmp_path):
    ckpt = _stock_train('mmdet', DET_GPLQ, det_fp32, str(tmp_path / 'train'))

    prefix_stock = str(tmp_path / 'stock')
    proc = run_script([stock_script('mmdet', 'test'),
                       osp.join(CONFIGS, DET_GPLQ), ckpt,
                       '--work-dir', str(tmp_path / 'test'),
                       '--cfg-options',
                       f'test_evaluator.outfile_prefix={prefix_stock}'],
                      cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    printed = last_metrics(proc.stdout + proc.stderr, 'coco')
    assert 'Average Precision' in proc.stdout
    for k in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP',
              'coco/segm_mAP_50'):
        assert k in printed, tail(proc)

    prefix_ours = str(tmp_path / 'ours')
    cfg = load_cfg(DET_GPLQ, tmp_path / 'inproc', load_from=ckpt)
    cfg.test_evaluator.outfile_prefix = prefix_ours
    metrics = Runner.from_cfg(cfg).test()
    assert set(printed) == set(metrics)
    for k, v in metrics.items():  # mmengine prints 4 decimals
        assert printed[k] == pytest.approx(v, abs=5e-5), k

    # the same predictions, not only the same (tiny) mAP
    for kind in ('bbox', 'segm'):
        a = read_json(f'{prefix_stock}.{kind}.json')
        b = read_json(f'{prefix_ours}.{kind}.json')
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert (x['image_id'], x['category_id']) == \
                (y['image_id'], y['category_id'])
            assert x['score'] == pytest.approx(y['score'], abs=1e-5)
            if kind == 'bbox':
                assert x['bbox'] == pytest.approx(y['bbox'], abs=1e-3)
            else:
                assert x['segmentation'] == y['segmentation']


@pytest.mark.slow
def test_mmpretrain_train_then_test_matches_in_process(deit_fp32, tmp_path):
    ckpt = _stock_train('mmpretrain', DEIT_GPLQ, deit_fp32[0],
                        str(tmp_path / 'train'))
    ck = torch.load(ckpt, weights_only=True)
    assert 'gplq_teacher' in ck  # mimic on: teacher saved for resume

    dump_stock = str(tmp_path / 'stock.pkl')
    proc = run_script([stock_script('mmpretrain', 'test'),
                       osp.join(CONFIGS, DEIT_GPLQ), ckpt,
                       '--work-dir', str(tmp_path / 'test'),
                       '--out', dump_stock, '--out-item', 'pred'], cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    printed = last_metrics(proc.stdout + proc.stderr, 'accuracy')
    assert 'accuracy/top1' in printed, tail(proc)

    dump_ours = str(tmp_path / 'ours.pkl')
    cfg = load_cfg(DEIT_GPLQ, tmp_path / 'inproc', load_from=ckpt)
    cfg.test_evaluator = [cfg.test_evaluator,
                          dict(type='DumpResults', out_file_path=dump_ours)]
    metrics = Runner.from_cfg(cfg).test()
    assert printed['accuracy/top1'] == pytest.approx(
        metrics['accuracy/top1'], abs=5e-5)
    a, b = mmengine.load(dump_stock), mmengine.load(dump_ours)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert x['img_path'] == y['img_path']
        torch.testing.assert_close(x['pred_score'], y['pred_score'])
