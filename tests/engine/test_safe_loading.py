"""gplq_mm never turns torch's safe loading off: importing it adds
nothing to torch's allow-list (torch's own entries aside) and keeps the default
``weights_only=True`` in place, so a checkpoint holding other objects is
still refused.  (That our own checkpoints load safely is checked wherever
they are read: ``torch.load(..., weights_only=True)`` throughout tests/.)"""
import os

from gplq_test_utils import REPO, run_script, tail

PROBE = r'''
import pickle, sys, torch
import mmdet, mmpretrain, mmengine.runner
before = set(map(repr, torch.serialization.get_safe_globals()))
import gplq_mm, gplq_mm.engine, gplq_mm.models
from gplq_mm.engine.safe_checkpoint import from_safe, to_safe
after = set(map(repr, torch.serialization.get_safe_globals()))
assert after == before, after - before
from mmengine.logging import HistoryBuffer
path = sys.argv[1]
torch.save({'hub': HistoryBuffer([1.0], [1])}, path)
try:
    torch.load(path)
except pickle.UnpicklingError:
    print('refused')
torch.save(to_safe({'hub': HistoryBuffer([1.0], [1])}), path)
hub = from_safe(torch.load(path))['hub']
print('converted', type(hub).__name__, hub.data[0].tolist())
'''


def test_importing_gplq_mm_keeps_safe_loading_on(tmp_path):
    env = {k: '' for k in ('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD',
                           'TORCH_FORCE_WEIGHTS_ONLY_LOAD')
           if k in os.environ}
    proc = run_script(['-c', PROBE, str(tmp_path / 'x.pth')], cwd=REPO,
                      env=env)
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.split() == ['refused', 'converted', 'HistoryBuffer',
                                   '[1.0]'], tail(proc)
