"""Stage 2 is reproducible: the same W32A4 checkpoint and seed give a
byte-identical W4A4 checkpoint (another --out-dir and --name included);
another --seed draws another calibration subset.

(Stage 1: tests/engine/test_kill_resume.py compares two stock train.py runs
with the same seed: same scale digest after calibration, bitwise-equal
checkpoints.)
"""
import hashlib
import json

import pytest
import torch

from gplq_test_utils import tail


def _sha(path) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_same_seed_same_checkpoint_bytes_other_seed_other_subset(
        runs, arch, tmp_path):
    a = arch['cls']
    common = [a.stage1_cfg, a.w32a4_ckpt, '--calib-images', 8,
              '--batch-size', 2]  # QwT on: 4 batches, fit + held-out halves
    outs = {}
    for tag, extra in (('a', ['--seed', 3]),
                       ('b', ['--seed', 3, '--name', 'again']),
                       ('c', ['--seed', 4])):
        out = tmp_path / tag
        proc = runs.quantize(*common, '--out-dir', out, *extra, cwd=tmp_path)
        assert proc.returncode == 0, tail(proc)
        name = 'again' if tag == 'b' else 'gplq_deit-micro_cls_w32a4'
        outs[tag] = (out / f'{name}_w4a4.pth', json.loads(
            (out / f'{name}_w4a4.json').read_text()))

    (pa, ra), (pb, rb), (pc, rc) = outs['a'], outs['b'], outs['c']
    # the report records the subset and the checkpoint's hash
    assert ra['calibration']['seed'] == 3 and rc['calibration']['seed'] == 4
    assert len(ra['calibration']['indices']) == 8
    assert len(set(ra['calibration']['images'])) == 8
    assert ra['checkpoint_sha256'] == _sha(pa)
    # same seed: same images, byte-identical checkpoint
    assert ra['calibration'] == rb['calibration']
    assert _sha(pa) == _sha(pb)
    # no wall-clock time in the checkpoint; it is in the report
    meta = torch.load(str(pa), weights_only=True)['meta']['gplq']
    assert 'time' not in meta and ra['time']
    # another seed: another subset, another QwT fit
    assert ra['calibration']['indices'] != rc['calibration']['indices']
    assert _sha(pa) != _sha(pc)
