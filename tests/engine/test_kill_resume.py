"""A stage-1 run killed by a signal and resumed with ``--resume`` ends exactly
as the uninterrupted run with the same seed.

The stock ``tools/train.py`` runs as a subprocess and is killed (SIGKILL /
SIGTERM) as soon as its first by-iteration checkpoint exists, i.e. inside
the single epoch of stage 1; ``tools/train.py --resume`` then finishes the
run.  Two gaps of mmengine 0.10 would make the result differ (see
``gplq_mm/engine/resume.py``): ``EpochBasedTrainLoop`` restarts the epoch at
its first batch, and checkpoints hold no RNG states (drop path, RPN/RoI
sampling).  ``GPLQSafeCheckpointHook`` closes both, so the comparison is
bitwise: weights, activation scales, optimizer state, the FP32 teacher and
its PCA basis, and the logged losses.
"""
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gplq_test_utils import (CONFIGS, DEIT_GPLQ, DET_GPLQ, REPO, Recorder,
                             ckpt_scales, load_cfg, log_text, run_script,
                             stock_script, tail, train)

# (package, stage-1 config, repeats of the training set, checkpoint interval,
#  extra config lines): one epoch of 64 (DeiT) / 24 (Mask R-CNN) iterations
CASES = {
    'deit': ('mmpretrain', DEIT_GPLQ, 4, 4,
             # drop path on: the resumed run must reproduce its masks
             'model = dict(model=dict(backbone=dict(drop_path_rate=0.1)))\n'),
    'mask-rcnn': ('mmdet', DET_GPLQ, 3, 2, ''),
}
SIGNALS = {'deit': signal.SIGKILL, 'mask-rcnn': signal.SIGTERM}


def _write_cfg(tmp_path, case) -> str:
    _, base, times, interval, extra = CASES[case]
    path = tmp_path / f'{case}_resume.py'
    path.write_text(
        f"_base_ = {osp.join(CONFIGS, base)!r}\n"
        'train_dataloader = dict(batch_size=1, dataset=dict(\n'
        f'    _delete_=True, type="RepeatDataset", times={times},\n'
        '    dataset=_base_.train_dataloader.dataset))\n'
        'default_hooks = dict(checkpoint=dict(by_epoch=False, '
        f'interval={interval}))\n'
        'train_cfg = dict(val_interval=100)\n' + extra)
    return str(path)


def _train_args(pkg, cfg, work, *extra):
    return [stock_script(pkg, 'train'), cfg, '--work-dir', work, *extra]


def _latest(work: str) -> str:
    with open(osp.join(work, 'last_checkpoint')) as f:
        return f.read().strip()


def _iters(path: str) -> int:
    return int(re.search(r'iter_(\d+)\.pth$', path).group(1))


def _kill_after_first_checkpoint(args, work, sig, timeout=300):
    """Start ``python args``; send ``sig`` once a checkpoint is complete
    (mmengine writes ``last_checkpoint`` after the file)."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    log = open(osp.join(osp.dirname(work), 'killed.out'), 'w')
    proc = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    marker = osp.join(work, 'last_checkpoint')
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            if osp.isfile(marker) and open(marker).read().endswith('.pth'):
                os.kill(proc.pid, sig)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    return proc.returncode


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert set(a) == set(b), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{what}: {len(differ)} tensors differ, e.g. ' \
        f'{differ[:3]}'


def _assert_same_run(ck_a: dict, ck_b: dict):
    _assert_same_tensors(ck_a['state_dict'], ck_b['state_dict'], 'weights')
    assert ckpt_scales(ck_a)  # activation scales are part of the state dict
    assert ck_a['meta']['iter'] == ck_b['meta']['iter']
    opt_a, opt_b = ck_a['optimizer']['state'], ck_b['optimizer']['state']
    assert set(opt_a) == set(opt_b)
    for k in opt_a:
        _assert_same_tensors(opt_a[k], opt_b[k], f'optimizer state {k}')
    assert ('gplq_teacher' in ck_a) == ('gplq_teacher' in ck_b)
    if 'gplq_teacher' in ck_a:
        ta, tb = ck_a['gplq_teacher'], ck_b['gplq_teacher']
        _assert_same_tensors(ta['state_dict'], tb['state_dict'], 'teacher')
        assert torch.equal(ta['pca_mean'], tb['pca_mean'])
        assert torch.equal(ta['pca_components'], tb['pca_components'])
    # the same loss in every iteration (the resumed run's message hub holds
    # the killed run's first iterations)
    la = ck_a['message_hub']['log_scalars']['train/loss']['log']
    lb = ck_b['message_hub']['log_scalars']['train/loss']['log']
    assert torch.equal(la, lb)


def _digest(text: str) -> str:
    found = re.findall(r'GPLQ: calibrated .*sha256 ([0-9a-f]{16})\)', text)
    assert len(found) == 1, text[-2000:]
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_killed_run_resumes_to_the_uninterrupted_result(case, request,
                                                         tmp_path):
    pkg = CASES[case][0]
    fp32 = request.getfixturevalue('deit_fp32')[0] if case == 'deit' \
        else request.getfixturevalue('det_fp32')
    cfg = _write_cfg(tmp_path, case)
    load = ['--cfg-options', f'load_from={fp32}']

    ref = str(tmp_path / 'uninterrupted')
    proc = run_script(_train_args(pkg, cfg, ref, *load), cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    final = _latest(ref)
    n_iters = _iters(final)

    work = str(tmp_path / 'killed')
    rc = _kill_after_first_checkpoint(_train_args(pkg, cfg, work, *load),
                                      work, SIGNALS[case])
    assert rc == -SIGNALS[case], f'the run ended before the signal ({rc})'
    resume_from = _latest(work)
    k = _iters(resume_from)
    assert 0 < k < n_iters  # killed inside the (only) epoch
    first_log = log_text(work)

    # same seed, same machine: the first run's calibration and its first
    # checkpoint are those of the reference run, bit for bit
    assert _digest(first_log) == _digest(log_text(ref))
    _assert_same_run(_load(resume_from), _load(osp.join(ref, f'iter_{k}.pth')))

    proc = run_script(_train_args(pkg, cfg, work, '--resume'), cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    log = log_text(work)
    assert log != first_log
    assert f'Auto resumed from the latest checkpoint {resume_from}' in log
    assert f'resumed epoch: 0, iter: {k}' in log
    # calibration is not redone; the teacher comes from the checkpoint
    assert 'scales were loaded from the checkpoint; skipping calibration' \
        in log
    assert 'GPLQ calibration: ' not in log and 'GPLQ: calibrated' not in log
    if case == 'deit':
        assert 'restored the FP32 teacher and PCA basis' in log
    n = n_iters
    assert (f'checkpoint saved after batch {k}/{n} of epoch 1; skipping '
            f'those {k} batches') in log
    assert f'restored the RNG states of the checkpoint (batch {k + 1})' in log
    assert _latest(work) == osp.join(work, f'iter_{n_iters}.pth')
    _assert_same_run(_load(_latest(work)), _load(final))


@pytest.mark.parametrize('loop', ['epoch', 'iter'])
def test_resume_in_process_restores_scales_and_result(loop, deit_fp32,
                                                      tmp_path):
    """In-process (a real Runner): resume from a mid-run checkpoint of an
    epoch-based and an iteration-based loop; the scales right after the
    resume are the checkpoint's and the run ends as the uninterrupted one."""
    options = {'model.model.backbone.drop_path_rate': 0.1,
               'train_dataloader.batch_size': 2,
               'default_hooks.checkpoint.by_epoch': False,
               'default_hooks.checkpoint.interval': 2}

    def cfg_for(work, **extra):
        cfg = load_cfg(DEIT_GPLQ, work, **options, **extra)
        if loop == 'iter':
            cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=8,
                                 val_interval=1000)
        return cfg

    ref = tmp_path / 'ref'
    train(cfg_for(ref, load_from=deit_fp32[0]))
    work = tmp_path / 'resumed'
    work.mkdir()
    shutil.copy(ref / 'iter_2.pth', work / 'iter_2.pth')
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    rec = Recorder()
    train(cfg_for(work, resume=True), rec)
    log = log_text(str(work))
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'skipping calibration' in log and 'GPLQ calibration: ' not in log
    saved = ckpt_scales(_load(str(ref / 'iter_2.pth')))
    assert set(rec.calibrated) == set(saved)
    for name, s in rec.calibrated.items():
        assert torch.equal(s, saved[name]), name
    if loop == 'epoch':
        assert 'skipping those 2 batches' in log
    assert 'restored the RNG states of the checkpoint' in log
    assert len(rec.outputs) == 6  # iterations 3..8 only
    _assert_same_run(_load(str(work / 'iter_8.pth')),
                     _load(str(ref / 'iter_8.pth')))
