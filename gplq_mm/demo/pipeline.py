"""The end-to-end demo: every method side by side, judged by the stock scripts.

Each stage is a subprocess (stock ``tools/train.py`` / ``tools/test.py`` of
mmdet or mmpretrain, ``tools/gplq_quantize.py``), run through
:mod:`gplq_mm.demo.measure` so its wall time and peak memory are its own.  A
finished stage leaves ``<stage>/done.json``; a re-run with the same settings
reuses it.
"""
import json
import os
import os.path as osp
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def stock_tool(pkg: str, tool: str) -> str:
    """Path of the stock ``tools/<tool>.py`` shipped in the pip package."""
    import importlib
    mod = importlib.import_module(pkg)
    path = osp.join(osp.dirname(mod.__file__), '.mim', 'tools', f'{tool}.py')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} not found: is {pkg} installed from a '
                                'wheel (it ships tools/ under .mim)?')
    return path


_METRIC = re.compile(r'([\w/]+): (-?\d+(?:\.\d+)?)')


def parse_test_metrics(log_text: str) -> Dict[str, float]:
    """Metrics of the last ``Epoch(test)`` line printed by a stock test.py."""
    lines = [l for l in log_text.splitlines() if 'Epoch(test)' in l]
    if not lines:
        raise ValueError('no "Epoch(test)" line in the test log')
    found = {k: float(v) for k, v in _METRIC.findall(lines[-1])}
    return {k: v for k, v in found.items() if '/' in k}


class StageError(RuntimeError):
    """A demo stage failed; the message names the command and its log."""


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    cached: bool = False
    outputs: Dict[str, str] = field(default_factory=dict)


class StageRunner:
    """Runs measured, cached stages under ``work_dir``."""

    def __init__(self, work_dir: str, env: Optional[Dict[str, str]] = None,
                 log=print, stop: Optional[threading.Event] = None):
        self.work_dir = work_dir
        self.env = dict(os.environ, **(env or {}))
        self.log = log
        self.stop = stop  # set by the caller when another pipeline failed

    def stage_dir(self, name: str) -> str:
        d = osp.join(self.work_dir, name)
        os.makedirs(d, exist_ok=True)
        return d

    def run(self, name: str, steps: List[List[str]], key: dict,
            outputs: Dict[str, str]) -> Stage:
        """Run ``steps`` (commands) as stage ``name`` unless cached.

        ``key`` identifies the settings; ``outputs`` are files the stage must
        produce (checked after it ran).
        """
        d = self.stage_dir(name)
        done = osp.join(d, 'done.json')
        if osp.exists(done):
            rec = json.load(open(done))
            if rec.get('key') == key and all(osp.exists(p) for p in outputs.values()):
                self.log(f'[{name}] cached ({rec["seconds"]:.0f}s when run)')
                return Stage(name, rec['seconds'], rec['peak_rss_mib'], True,
                             outputs)
            os.remove(done)
        self.log(f'[{name}] running ({len(steps)} step(s)); log: {d}/')
        total, peak = 0.0, 0.0
        for i, cmd in enumerate(steps):
            if self.stop is not None and self.stop.is_set():
                raise StageError(f'stage {name} not run: another demo '
                                   'pipeline failed (see its error)')
            mj, ml = osp.join(d, f'step{i}.json'), osp.join(d, f'step{i}.log')
            t0 = time.time()
            rc = subprocess.run([sys.executable, '-m', 'gplq_mm.demo.measure',
                                 mj, ml, '--', *cmd], env=self.env,
                                cwd=REPO).returncode
            rec = json.load(open(mj)) if osp.exists(mj) else {}
            total += rec.get('seconds', time.time() - t0)
            peak = max(peak, rec.get('peak_rss_mib', 0.0))
            if rc != 0:
                tail = ''.join(open(ml).readlines()[-25:]) if osp.exists(ml) else ''
                raise StageError(f'stage {name} step {i} failed (exit {rc}): '
                                   f'{" ".join(cmd)}\n--- end of {ml} ---\n{tail}')
            self.log(f'[{name}] step {i + 1}/{len(steps)} done in '
                     f'{rec.get("seconds", 0):.0f}s')
        missing = [p for p in outputs.values() if not osp.exists(p)]
        if missing:
            raise StageError(f'stage {name} finished but did not write {missing}')
        json.dump(dict(key=key, seconds=total, peak_rss_mib=peak,
                       outputs=outputs), open(done, 'w'), indent=1)
        return Stage(name, total, peak, False, outputs)

    def test_metrics(self, name: str) -> Dict[str, float]:
        """Metrics printed by the last step (a stock test.py) of a stage."""
        d = osp.join(self.work_dir, name)
        logs = sorted(f for f in os.listdir(d) if re.match(r'step\d+\.log$', f))
        return parse_test_metrics(open(osp.join(d, logs[-1])).read())


def latest_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()
