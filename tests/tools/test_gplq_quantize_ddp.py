"""Stage 2 under torch.distributed (2 gloo processes, CPU) equals one process.

``tools/gplq_quantize.py --launcher pytorch`` under ``python -m
torch.distributed.run --nproc_per_node 2`` against the same command in one
process, on the micro models of ``tests/configs`` (checkpoints from
``tests/tools/conftest.py``):

* detector, ``--method gplq`` (GPTQ rounding, the default): GPTQ's input
  Gram matrices (sums of integer products: exact whatever the order, so the
  codes must be equal) and the QwT sums all-reduced over the processes;
* classifier, ``--method repq --weight-rounding nearest``: activation
  statistics (percentile histograms) all-reduced as well, then QwT (with
  nearest rounding the compensations are kept, so they are compared too).

The calibration subset is cut into global batches (batch ``g`` on rank
``g % 2``; held out for QwT iff ``g`` is odd), so both runs fit on the same
batches with the same fit/held-out split.
"""
import json
import os
import os.path as osp
import socket

import pytest
import torch
from gplq_test_utils import REPO, tail

TOOL = osp.join(REPO, 'tools', 'gplq_quantize.py')


def test_global_batches_do_not_depend_on_the_process_count():
    """The sampler behind the split (no processes needed)."""
    from gplq_mm.ptq.calib import CalibBatchSampler
    one = CalibBatchSampler(7, 2)  # 4 global batches, the last one short
    assert list(one) == [[0, 1], [2, 3], [4, 5], [6]]
    assert one.global_ids == [0, 1, 2, 3] and len(one) == 4
    for world in (2, 3, 4):
        shares = [CalibBatchSampler(7, 2, r, world) for r in range(world)]
        assert all(len(s) >= 1 for s in shares)
        got = {g: b for s in shares for g, b in zip(s.global_ids, s)}
        assert sorted(got) == [0, 1, 2, 3]  # every batch on exactly one rank
        assert [got[g] for g in range(4)] == list(one)  # the same batches
    # with 2 processes the QwT fit half (even g) is all on rank 0
    assert CalibBatchSampler(7, 2, 0, 2).global_ids == [0, 2]
    with pytest.raises(ValueError, match=r'gives 4 calibration batch\(es\), '
                       r'fewer than the 5 processes.*--calib-images 10 or '
                       r'more, or a smaller --batch-size'):
        CalibBatchSampler(7, 2, 0, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(runs, args, out_dir, nproc, cwd):
    cmd = [TOOL, *args, '--out-dir', out_dir]
    if nproc > 1:
        cmd = ['-m', 'torch.distributed.run', '--nproc_per_node', nproc,
               '--master_addr', '127.0.0.1', '--master_port', _free_port(),
               *cmd, '--launcher', 'pytorch']
    return runs(cmd, cwd)


def _clean_exit(proc):
    assert proc.returncode == 0, tail(proc)
    assert 'Traceback' not in proc.stderr, tail(proc)
    # gloo torn down before exit (no abort at interpreter shutdown)
    assert 'terminate called' not in proc.stderr, tail(proc)


# case: (arch, config attribute, checkpoint attribute, extra arguments)
CASES = {
    'det-gplq': ('det', 'stage1_cfg', 'w32a4_ckpt', []),
    # (lambda 10: with 8 images of 17 tokens the default fit over-fits and
    # is never kept; this keeps it, so the compensations are compared too)
    'cls-repq': ('cls', 'plain_cfg', 'fp32_ckpt',
                 ['--method', 'repq', '--qwt-lambda', 10,
                  '--weight-rounding', 'nearest']),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_two_processes_equal_one(runs, arch, tmp_path, case):
    name, cfg_attr, ckpt_attr, extra = CASES[case]
    a = arch[name]
    cfg, ckpt = getattr(a, cfg_attr), getattr(a, ckpt_attr)
    # 8 images in batches of 2: 4 global batches, 2 per process
    args = [cfg, ckpt, '--calib-images', 8, '--batch-size', 2, *extra]
    stem = osp.splitext(osp.basename(cfg))[0] + '_w4a4'
    res = {}
    for nproc in (1, 2):
        out = tmp_path / f'np{nproc}'
        proc = _run(runs, args, out, nproc, tmp_path)
        _clean_exit(proc)
        # rank 0 alone wrote, and only the outputs (no partial/temporary file)
        assert sorted(os.listdir(out)) == sorted(
            f'{stem}.{ext}' for ext in ('py', 'pth', 'json', 'log')), tail(proc)
        log = (out / f'{stem}.log').read_text()
        assert f'{4 // nproc} batches on rank 0' in log, log[-2000:]
        assert ('GPTQ: input Gram matrices of' in log) == \
            ('nearest' not in extra), log[-2000:]
        res[nproc] = (
            torch.load(str(out / f'{stem}.pth'), map_location='cpu',
                       weights_only=True),
            json.loads((out / f'{stem}.json').read_text()))
    (c1, r1), (c2, r2) = res[1], res[2]

    sd1, sd2 = c1['state_dict'], c2['state_dict']
    assert set(sd1) == set(sd2)
    floats = 0
    for k, t1 in sd1.items():
        t2 = sd2[k]
        assert t1.dtype == t2.dtype and t1.shape == t2.shape, k
        if not t1.is_floating_point():  # packed int4 / int8 codes, counters
            assert torch.equal(t1, t2), k
            continue
        floats += 1
        # Data-dependent floats: the QwT compensations (and, for repq, the
        # activation scales).  The histograms and min/max of the scales
        # are exact under all-reduce.  The float64 QwT sums of the two runs
        # differ at most in the order in which the batches are added
        # (relative ~1e-16); the solve amplifies that by at most the
        # condition number it accepts (solve_ridge falls back to lstsq
        # beyond ~1/(n eps)), and the float32 cast rounds at 6e-8.  With
        # two processes the fit half is all on rank 0 and the held-out half
        # all on rank 1, so in practice the tensors are bitwise equal.
        torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, k=k: f'{k}: {m}')
    assert floats and any('.qwt.' in k for k in sd1)
    assert c1['meta']['gplq'] == c2['meta']['gplq']

    b1, b2 = r1['report']['blocks'], r2['report']['blocks']
    assert [(b['name'], b['kept'], b['rows']) for b in b1] == \
        [(b['name'], b['kept'], b['rows']) for b in b2]
    assert any(b['kept'] for b in b1)
    for x, y in zip(b1, b2):
        for key in ('r2', 'err_before', 'err_after'):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-12), \
                (x['name'], key)
    assert r1['qwt_blocks_kept'] == r2['qwt_blocks_kept']
    assert r1['integer_layers'] == r2['integer_layers']


@pytest.mark.slow
def test_fewer_batches_than_processes_fails_cleanly(runs, arch, tmp_path):
    """2 images in one batch for 2 processes: a clear error on every rank
    before any calibration work (no rank stalls in an all-reduce), the gloo
    group torn down, and --out-dir left as it was."""
    a = arch['cls']
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('pre-existing')
    proc = _run(runs, [a.stage1_cfg, a.w32a4_ckpt, '--calib-images', 2,
                       '--batch-size', 2], out, 2, tmp_path)
    assert proc.returncode != 0, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert msg, tail(proc)
    assert ('--calib-images 2 with --batch-size 2 gives 1 calibration '
            'batch(es), fewer than the 2 processes') in msg[0], msg[0]
    assert 'pass --calib-images 4 or more' in msg[0], msg[0]
    assert 'terminate called' not in proc.stderr, tail(proc)
    assert 'calibration: batch' not in proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ['keep.txt'], tail(proc)
