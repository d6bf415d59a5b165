"""Resume and calibration-count mistakes that used to train a wrong model
silently, and the calibration batch count at its limits."""
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from gplq_test_utils import (CONFIGS, DEIT_GPLQ, REPO, Recorder, load_cfg,
                             log_text, run_script, stock_script, tail, train)


@pytest.mark.slow
def test_mmpretrain_resume_with_load_from_option_is_refused(deit_fp32,
                                                             tmp_path):
    """mmpretrain's train.py applies --cfg-options after --resume, so
    ``--resume --cfg-options load_from=FP32.pth`` "resumes" from the FP32
    file (mmengine: KeyError 'epoch', or with an official checkpoint whose
    meta has epoch 300: a run that trains nothing)."""
    proc = run_script([
        stock_script('mmpretrain', 'train'), osp.join(CONFIGS, DEIT_GPLQ),
        '--work-dir', str(tmp_path / 'work'), '--resume',
        '--cfg-options', f'load_from={deit_fp32[0]}'], cwd=REPO)
    assert proc.returncode != 0, tail(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'RuntimeError: GPLQ: --resume is resuming from '
                           f'{deit_fp32[0]}, which holds no activation '
                           'scales'), tail(proc)
    assert 'drop load_from' in last and '--resume WORK_DIR/iter_N.pth' in last


def test_resume_with_nothing_to_resume_is_refused(cls_root, tmp_path):
    """Killed before the first checkpoint, then --resume: mmengine finds no
    checkpoint, loads nothing and would calibrate and train a randomly
    initialised model."""
    cfg = load_cfg(DEIT_GPLQ, tmp_path / 'work', resume=True)
    with pytest.raises(RuntimeError, match='no checkpoint was loaded, so the '
                       'model holds randomly initialised weights'):
        train(cfg)
    assert 'Auto resumed from the latest checkpoint None' in \
        log_text(str(tmp_path / 'work'))


def test_zero_calibration_batches_is_refused(cls_root, tmp_path):
    cfg = load_cfg(DEIT_GPLQ, tmp_path, **{'custom_hooks.0.num_batches': 0})
    with pytest.raises(ValueError, match=r'num_batches=0\): calibration '
                       'needs at least one batch'):
        Runner.from_cfg(cfg)


def test_more_calibration_batches_than_the_dataset_has(deit_fp32, tmp_path):
    """16 images in batches of 4: asking for 10 batches calibrates on all 4
    and says so."""
    cfg = load_cfg(DEIT_GPLQ, tmp_path, load_from=deit_fp32[0],
                   **{'custom_hooks.0.num_batches': 10})
    cfg.train_cfg.max_epochs = 1
    rec = Recorder()
    train(cfg, rec)
    log = log_text(str(tmp_path))
    assert 'the train dataloader had only 4 batches (asked for 10)' in log
    assert all(rec.initialized.values())
    for name, s in rec.calibrated.items():
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), name


def test_config_without_exact_resume_hook_is_warned(deit_fp32, tmp_path):
    """A stage-1 config from before the resume hook was split out (only
    GPLQSafeCheckpointHook) still trains, but the log says that --resume
    would not be exact and how to fix the config."""
    cfg = load_cfg(DEIT_GPLQ, tmp_path / 'work', load_from=deit_fp32[0])
    cfg.default_hooks.pop('exact_resume')
    cfg.train_dataloader.dataset.indices = 4
    train(cfg)
    text = log_text(str(tmp_path / 'work'))
    assert 'GPLQExactResumeHook is not registered' in text
    assert 'exact_resume=dict(type="GPLQExactResumeHook")' in text
