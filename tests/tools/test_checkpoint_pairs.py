"""Checkpoint and config that do not belong together, and files that are no
checkpoint at all (see docs/reliability.md for what each case shows).

* W4A4 checkpoint + stage-1 config: tests/tools/test_gplq_quantize.py::
  test_w4a4_checkpoint_with_stage1_config (stock test.py).
* FP32 or W32A4 checkpoint + W4A4 config (stock test.py), W4A4 checkpoint
  given to gplq_quantize.py: CheckpointMismatchError naming weight_packed.
* W4A4 checkpoint + the plain FP32 config: gplq_mm is not imported, so
  nothing of ours runs; mmengine loads non-strictly, warns and evaluates an
  unloaded model.  The test pins down that warning (documented limitation).
* Random bytes / text / a damaged archive: "not a readable torch
  checkpoint", never the advice to --trust the file.
"""
import os.path as osp
import random
import re

import pytest

from gplq_mm.engine.safe_checkpoint import (UnsafeCheckpointError,
                                            load_checkpoint_file)
from gplq_test_utils import REPO, stock_script, tail


def _stock_test(runs, cfg, ckpt, work):
    return runs([stock_script('mmpretrain', 'test'), cfg, ckpt, '--work-dir',
                 work], cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize('which', ['fp32', 'w32a4'])
def test_float_checkpoint_with_w4a4_config_fails(which, runs, cls_w4a4,
                                                 tmp_path):
    a = cls_w4a4.arch
    ckpt = a.fp32_ckpt if which == 'fp32' else a.w32a4_ckpt
    proc = _stock_test(runs, cls_w4a4.cfg, ckpt, tmp_path / 'wd')
    assert proc.returncode != 0, tail(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('gplq_mm.models.gplq_model.CheckpointMismatchError'
                           ': Checkpoint does not match'), tail(proc)
    # the integer layers' keys (input_shift, weight_packed, ...) are named
    assert re.search(r'missing model keys: [^;]*model\.backbone\.patch_embed'
                     r'\.projection\.weight_packed', last), last
    assert 'Integer (W4A4) and float (W32A4/FP32) checkpoints differ' in last
    assert 'accuracy/top1' not in proc.stdout + proc.stderr


def test_w4a4_checkpoint_given_to_gplq_quantize_fails(runs, cls_w4a4,
                                                      tmp_path):
    out = tmp_path / 'out'
    proc = runs.quantize(cls_w4a4.arch.stage1_cfg, cls_w4a4.ckpt,
                         '--out-dir', out, cwd=tmp_path)
    assert proc.returncode != 0, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert len(msg) == 1 and 'Traceback' not in proc.stderr, tail(proc)
    assert 'Checkpoint does not match the GPLQ model' in msg[0]
    assert re.search(r'unexpected keys: [^;]*model\.backbone\.patch_embed'
                     r'\.projection\.weight_packed', msg[0]), msg[0]
    assert not out.exists()


@pytest.mark.slow
def test_w4a4_checkpoint_with_plain_config_only_warns(runs, cls_w4a4,
                                                      tmp_path):
    """Documented limitation: without GPLQModel in the config, mmengine's
    non-strict loading only warns (every key unexpected / missing)."""
    proc = _stock_test(runs, cls_w4a4.arch.plain_cfg, cls_w4a4.ckpt,
                       tmp_path / 'wd')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, tail(proc)
    assert 'The model and loaded state dict do not match exactly' in out
    assert 'unexpected key in source state_dict: model.backbone.' in out
    assert 'missing keys in source state_dict: backbone.' in out


def _damaged(kind: str, src: str, dst: str) -> str:
    if kind == 'random-bytes':
        data = random.Random(0).randbytes(4096)
    elif kind == 'text':
        data = b'version https://git-lfs.github.com/spec/v1\noid sha256:0\n'
    else:  # a zip archive with damaged bytes
        data = bytearray(open(src, 'rb').read())
        for i in range(2000, len(data), 997):
            data[i] ^= 0xFF
        data = bytes(data)
    with open(dst, 'wb') as f:
        f.write(data)
    return dst


@pytest.mark.parametrize('kind', ['random-bytes', 'text', 'damaged-zip'])
def test_damaged_file_is_not_called_unsafe(kind, arch, tmp_path):
    bad = _damaged(kind, arch['cls'].w32a4_ckpt, str(tmp_path / 'bad.pth'))
    with pytest.raises(RuntimeError) as err:
        load_checkpoint_file(bad)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert 'is not a readable torch checkpoint (truncated or corrupted?)' \
        in str(err.value)
    assert '--trust' not in str(err.value)


def test_damaged_file_through_gplq_quantize(runs, arch, tmp_path):
    bad = _damaged('text', '', str(tmp_path / 'lfs_pointer.pth'))
    out = tmp_path / 'out'
    proc = runs.quantize(arch['cls'].stage1_cfg, bad, '--out-dir', out,
                         cwd=tmp_path)
    assert proc.returncode != 0, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert len(msg) == 1 and 'Traceback' not in proc.stderr, tail(proc)
    assert 'lfs_pointer.pth is not a readable torch checkpoint' in msg[0]
    assert '--trust' not in msg[0]
    assert not out.exists() and osp.isfile(bad)
