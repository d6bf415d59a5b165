"""The fast demo variant end to end through the stock scripts (pipeline
invariants, not accuracy: --fast trains on a handful of images)."""
import json
import re
import os.path as osp
import subprocess
import sys

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

STAGES = ('fp32', 'ptq', 'ptq_qwt', 'repqvit', 'qat', 'gplq_w32a4',
          'gplq_w4a4')
# the real-pretrained classifier also probes every row on downstream sets
PROBED = {'det': False, 'dino': True}


@pytest.mark.slow
def test_fast_demo(tmp_path):
    # both default pipelines at once, side by side (the default on 2 cores):
    # the tiny Swin detector and the DINOv2 classifier (real weights)
    work = tmp_path / 'demo'
    cmd = [sys.executable, osp.join(REPO, 'tools', 'gplq_demo.py'), '--fast',
           '--jobs', '2', '--work-dir', str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((work / 'results.json').read_text())
    assert list(res['tasks']) == ['det', 'dino'] and res['jobs'] == 2
    # the two pipelines' progress lines are told apart
    assert '[gplq_demo det ' in proc.stdout and '[gplq_demo dino ' in proc.stdout
    for task in ('det', 'dino'):
        _check_task(res, task, work)
    # a re-run reuses every finished stage of both pipelines
    proc2 = subprocess.run(cmd, capture_output=True, text=True)
    assert proc2.returncode == 0, proc2.stdout[-2000:]
    reused = re.findall(r'\] cached \(', proc2.stdout)
    assert len(reused) == 3 * len(STAGES), proc2.stdout[-2000:]


def _check_task(res, task, work):
    rows = res['tasks'][task]['rows']
    assert len(rows) == len(STAGES)
    metrics = res['tasks'][task]['metrics']
    for row in rows:
        # every stage produced its checkpoint and the stock test script's
        # numbers were parsed
        assert osp.isfile(row['checkpoint'])
        for m in metrics:
            assert isinstance(row[m], float) and row[m] >= 0
        assert row['seconds'] > 0 and row['peak_rss_mib'] > 0
    by = {r['method']: r for r in rows}
    fp32 = by['FP32']['checkpoint_mib']
    for name, row in by.items():
        if 'W4A4' not in name:
            continue
        ck = torch.load(row['checkpoint'], map_location='cpu',
                        weights_only=True)
        packed = any(k.endswith('weight_packed') for k in ck['state_dict'])
        if 'simulated' in name:  # RepQ-ViT: fake quant, 4-bit values as floats
            assert ck['meta']['gplq']['simulated'] and not packed, name
        else:  # integer checkpoints are smaller than FP32
            assert row['checkpoint_mib'] < fp32 and packed, name
    md = (work / 'results.md').read_text()
    assert md.count(f'## {task}\n') == 1
    if PROBED[task]:  # the paper's Table 1 protocol: downstream linear probes
        assert f'### {task}: downstream linear probes' in md
        for row in rows:
            ds = row['downstream']
            assert set(ds) == {'digits', 'shapes', 'average'}
            for v in ds.values():
                assert 0 <= v['mean'] <= 100 and v['n'] == 1
            assert ds['average']['mean'] == pytest.approx(
                (ds['digits']['mean'] + ds['shapes']['mean']) / 2)
    assert (work / 'results.png').stat().st_size > 1000
