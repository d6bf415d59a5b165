"""Stage 1 (Act-QAT) through a real ``Runner.from_cfg(cfg).train()``.

The FP32 checkpoints are plain models' state dicts saved with
``torch.save({'state_dict': sd, 'meta': {}})``, as a user would have them.
"""
import pytest
import torch
from mmengine.logging import HistoryBuffer

from gplq_test_utils import (DEIT_GPLQ, Recorder, ckpt_scales, load_cfg,
                             log_text, train)


def _check_calibrated(rec):
    assert rec.initialized and all(rec.initialized.values())
    for n, s in rec.calibrated.items():
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), n
    # not the construction-time placeholder any more
    assert sum(not torch.equal(s, torch.ones_like(s))
               for s in rec.calibrated.values()) > 0.9 * len(rec.calibrated)


def _check_optimizer_and_learning(rec):
    groups = rec.param_groups
    learnable = {n for n, (_, g) in rec.scale_params.items() if g}
    frozen = set(rec.scale_params) - learnable
    assert learnable and frozen  # post-softmax log2 quantizers: fixed scale
    assert all('attn_quant' in n for n in frozen)
    for n, (pid, grad) in rec.scale_params.items():
        where = [g for g in groups if pid in g['ids']]
        if grad:
            assert len(where) == 1, n
            assert where[0]['weight_decay'] == 0.0, n  # no decay on scales
        else:
            assert not where, n
    assert any(g['weight_decay'] == 0.05 for g in groups)  # other weights
    # one optimizer step moved the learnable scales, not the fixed ones
    changed = [n for n in learnable
               if not torch.equal(rec.calibrated[n], rec.first_iter_scales[n])]
    assert len(changed) >= 0.9 * len(learnable), sorted(
        learnable - set(changed))
    for n in frozen:
        assert torch.equal(rec.calibrated[n], rec.first_iter_scales[n])


def test_det_stage1(det_stage1):
    rec = det_stage1.rec
    _check_calibrated(rec)
    _check_optimizer_and_learning(rec)
    assert 'GPLQ calibration: 2 batches for activation scales' in \
        det_stage1.log
    assert rec.epoch == 1 and len(rec.outputs) == 4
    # the checkpoint (loaded with weights_only=True in the fixture) holds the
    # trained scales, all marked initialized
    ck = det_stage1.loaded
    saved = ckpt_scales(ck)
    assert set(saved) == set(rec.after_train_scales)
    for n, s in rec.after_train_scales.items():
        assert torch.equal(saved[n], s)
    inits = [v for k, v in ck['state_dict'].items()
             if k.endswith('_quant.initialized')]
    assert len(inits) == len(saved) and all(bool(v) for v in inits)
    assert 'gplq_teacher' not in ck  # no mimicking for detection


def test_deit_stage1_with_mimic(deit_stage1):
    rec = deit_stage1.rec
    _check_calibrated(rec)
    _check_optimizer_and_learning(rec)
    # the frozen FP32 teacher: never in the optimizer, unchanged by training
    assert rec.teacher_before is not None and rec.teacher_after is not None
    assert not rec.teacher_param_ids & set().union(
        *[g['ids'] for g in rec.param_groups])
    for k, v in rec.teacher_before.items():
        assert torch.equal(v, rec.teacher_after[k]), k
    # teacher = the FP32 checkpoint's weights, quantizers off
    fp32 = torch.load(deit_stage1.fp32, weights_only=True)['state_dict']
    for k, v in fp32.items():
        assert torch.equal(rec.teacher_before[k], v), k
    # the PCA basis: k rounded to the configured multiple (8), orthonormal
    mean, comps = rec.pca
    assert mean.shape == (32, ) and comps.shape[0] == 32
    assert comps.shape[1] % 8 == 0 and 0 < comps.shape[1] <= 32
    torch.testing.assert_close(comps.t() @ comps,
                               torch.eye(comps.shape[1]), atol=1e-4, rtol=0)
    # loss_mimic: in every iteration's outputs, the log and the message hub
    assert len(rec.outputs) == 4
    assert all(o['loss_mimic'] > 0 for o in rec.outputs)
    assert all(o['loss'] > o['loss_mimic'] for o in rec.outputs)
    assert 'loss_mimic: ' in deit_stage1.log
    assert 'train/loss_mimic' in rec.final_scalars
    assert 'GPLQ mimic: PCA on 8 teacher features of dim 32' in \
        deit_stage1.log
    # the teacher travels in the checkpoint (for resume)
    saved = deit_stage1.loaded['gplq_teacher']
    assert torch.equal(saved['pca_components'], comps)
    for k, v in saved['state_dict'].items():
        assert torch.equal(v, rec.teacher_before[k])


def test_calibration_uses_the_loaded_weights(deit_fp32, deit_stage1,
                                             tmp_path):
    """Calibration runs in before_train, after load_from: the model it
    calibrates holds the checkpoint's weights, and another checkpoint gives
    other scales."""
    rec_a = deit_stage1.rec
    fp32_a = torch.load(deit_fp32[0], weights_only=True)['state_dict']
    for k, v in fp32_a.items():
        assert torch.equal(rec_a.loaded_state[f'model.{k}'], v), k

    cfg = load_cfg(DEIT_GPLQ, tmp_path, load_from=deit_fp32[1])
    cfg.train_dataloader.dataset.indices = 4  # one iteration is enough here
    rec_b = Recorder()
    train(cfg, rec_b)
    fp32_b = torch.load(deit_fp32[1], weights_only=True)['state_dict']
    for k, v in fp32_b.items():
        assert torch.equal(rec_b.loaded_state[f'model.{k}'], v), k
    differ = [n for n in rec_a.calibrated
              if not torch.allclose(rec_a.calibrated[n], rec_b.calibrated[n])]
    assert len(differ) >= 0.9 * len(rec_a.calibrated)


def test_loading_a_calibrated_checkpoint_skips_calibration(deit_stage1,
                                                           tmp_path):
    cfg = load_cfg(DEIT_GPLQ, tmp_path, load_from=deit_stage1.ckpt)
    cfg.train_dataloader.dataset.indices = 4
    rec = Recorder()
    train(cfg, rec)
    log = log_text(str(tmp_path))
    assert 'skipping calibration' in log
    assert 'GPLQ calibration: ' not in log
    saved = ckpt_scales(deit_stage1.loaded)
    for n, s in rec.calibrated.items():
        assert torch.equal(s, saved[n]), n
    # the teacher and PCA basis of the first run, not rebuilt from the
    # (already trained) weights
    assert 'restored the FP32 teacher' in log
    t = deit_stage1.loaded['gplq_teacher']
    assert torch.equal(rec.pca[1], t['pca_components'])
    for k, v in t['state_dict'].items():
        assert torch.equal(rec.teacher_before[k], v), k


def test_resume_restores_scales_teacher_and_message_hub(deit_stage1,
                                                        tmp_path):
    """--resume / resume=True: scales, teacher and the message hub come
    back from the (weights_only-safe) checkpoint and training continues."""
    import shutil
    work = tmp_path / 'work'
    shutil.copytree(deit_stage1.work_dir, work)
    cfg = load_cfg(DEIT_GPLQ, work, resume=True)
    cfg.train_cfg.max_epochs = 2
    rec = Recorder()
    train(cfg, rec)
    log = log_text(str(work))
    assert 'resumed epoch: 1' in log
    assert 'skipping calibration' in log and 'GPLQ calibration: ' not in log
    saved = ckpt_scales(deit_stage1.loaded)
    for n, s in rec.calibrated.items():
        assert torch.equal(s, saved[n]), n
    t = deit_stage1.loaded['gplq_teacher']
    for k, v in t['state_dict'].items():
        assert torch.equal(rec.teacher_before[k], v), k
    # the message hub came back as HistoryBuffer objects holding epoch 1
    loss_hist = rec.message_hub_scalars['train/loss']
    assert isinstance(loss_hist, HistoryBuffer)
    first_run = [o['loss'] for o in deit_stage1.rec.outputs]
    torch.testing.assert_close(
        torch.tensor(loss_hist.data[0], dtype=torch.float64),
        torch.tensor(first_run, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # and training went on for epoch 2
    assert rec.epoch == 2 and rec.iter == 8 and len(rec.outputs) == 4
    ck = torch.load(str(work / 'epoch_2.pth'), weights_only=True)
    assert ck['meta']['epoch'] == 2
    assert len(ck['message_hub']['log_scalars']['train/loss']['log']) == 8


def test_drift_hook_logs_how_far_scales_and_weights_moved(deit_stage1):
    """GPLQDriftHook (default_hooks.drift): relative change since calibration,
    per tensor, of the learnable scales and the trainable weights."""
    import re
    rec = deit_stage1.rec
    learnable = [n for n, (_, grad) in rec.scale_params.items() if grad]
    rel = torch.stack([
        (rec.after_train_scales[n] - rec.calibrated[n]).norm() /
        rec.calibrated[n].norm() for n in learnable
    ])
    m = re.search(
        r'GPLQ drift after epoch 1: activation scales median (\S+), max (\S+) '
        r'over (\d+); weights median (\S+), max (\S+) over (\d+)',
        deit_stage1.log)
    assert m, 'no drift line in the stage-1 log'
    assert int(m.group(3)) == len(learnable)
    # 4 AdamW steps moved every scale a little (the numbers are the hook's own
    # computation, checked here against the recorder's copies)
    assert float(m.group(1)) == pytest.approx(float(rel.median()), rel=0.01)
    assert float(m.group(2)) == pytest.approx(float(rel.max()), rel=0.01)
    assert 0 < float(m.group(4)) <= float(m.group(5))
    assert int(m.group(6)) > 0
    assert 'gplq/scale_drift_median' in rec.final_scalars
