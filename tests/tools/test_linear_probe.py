"""tools/linear_probe.py: sizes the probe cannot work with are refused with
the option to change, before any data is written or model built."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize('opt,value,msg', [
    ('--num-train', '40', '--num-train 40: the probe chooses its C on 20%'),
    ('--num-test', '5', '--num-test 5: use at least 10 test images'),
])
def test_too_few_images_is_a_clear_error(tmp_path, opt, value, msg):
    cfg, ckpt = tmp_path / 'c.py', tmp_path / 'c.pth'
    cfg.write_text('x = 1\n')
    ckpt.write_bytes(b'')
    out = tmp_path / 'downstream'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools',
                                                     'linear_probe.py'),
                        str(cfg), str(ckpt), '--data-root', str(out), opt,
                        value], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert 'Traceback' not in r.stderr
    assert not out.exists()  # nothing written
