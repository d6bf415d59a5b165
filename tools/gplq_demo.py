"""End-to-end GPLQ demo on data the project generates, every method side by side.

    python tools/gplq_demo.py [--work-dir work_dirs/demo] [--fast] [--only det|cls]
                              [--jobs N]

Stages (each a subprocess through the *stock* OpenMMLab scripts, cached in
``--work-dir`` so that a re-run is fast):

  1. generate data (COCO-format shapes for Mask R-CNN; Fashion-MNIST or a
     generated fallback for the classifier)
  2. train the FP32 models (stock tools/train.py)
  3. percentile W4A4 PTQ (GPLQ's placement), without and with QwT
                                                      (tools/gplq_quantize.py --method repq)
     RepQ-ViT W4A4, as its public code does it (simulated)  (--method repqvit)
  4. direct W4A4 QAT, one epoch                       (stock train.py + --method qat)
  5. GPLQ stage 1: Act-QAT, one epoch -> W32A4          (stock train.py)
  6. GPLQ stage 2: weight PTQ + QwT -> W4A4             (tools/gplq_quantize.py)
  7. every checkpoint evaluated by the stock tools/test.py

It prints one table per task and writes results.json, results.md and
results.png to the work dir.  The detector and classifier pipelines run side by
side (``--jobs 2``, the default on a machine with 2 or more cores): every stage
process uses one OpenMP thread, so on 2 cores each pipeline has a core.
"""
import argparse
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
import os.path as osp
import sys
import time
from typing import Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

from gplq_mm.demo.pipeline import StageError, StageRunner, stock_tool  # noqa: E402

PY = sys.executable
QUANTIZE = osp.join(REPO, 'tools', 'gplq_quantize.py')
CONVERT = osp.join(REPO, 'tools', 'convert_checkpoint.py')
PROBE = osp.join(REPO, 'tools', 'linear_probe.py')

TASKS = {
    'det': dict(
        pkg='mmdet',
        fp32=osp.join(REPO, 'configs/demo/mask-rcnn_swin-tiny_fpn_shapes.py'),
        gplq=osp.join(REPO, 'configs/demo/gplq_mask-rcnn_swin-tiny_fpn_shapes_w32a4.py'),
        qat=osp.join(REPO, 'configs/demo/qat_mask-rcnn_swin-tiny_fpn_shapes_w4a4.py'),
        metrics=[('box AP', 'coco/bbox_mAP'), ('mask AP', 'coco/segm_mAP')],
        env='GPLQ_DEMO_SHAPES'),
    # real pretrained weights: DINOv2 ViT-S/14 (tools/convert_dinov2.py)
    'dino': dict(
        pkg='mmpretrain',
        fp32=osp.join(REPO, 'configs/demo/dinov2-s_fashionmnist.py'),
        gplq=osp.join(REPO, 'configs/demo/gplq_dinov2-s_fashionmnist_w32a4.py'),
        qat=osp.join(REPO, 'configs/demo/qat_dinov2-s_fashionmnist_w4a4.py'),
        metrics=[('top-1', 'accuracy/top1')],
        env='GPLQ_DEMO_DINO', pretrained='dinov2', probe=True),
    # a tiny DeiT trained from scratch (no outliers: see docs/results.md)
    'cls': dict(
        pkg='mmpretrain',
        fp32=osp.join(REPO, 'configs/demo/deit-tiny_fashionmnist.py'),
        gplq=osp.join(REPO, 'configs/demo/gplq_deit-tiny_fashionmnist_w32a4.py'),
        qat=osp.join(REPO, 'configs/demo/qat_deit-tiny_fashionmnist_w4a4.py'),
        metrics=[('top-1', 'accuracy/top1')],
        env='GPLQ_DEMO_CLS'),
}
DEFAULT_TASKS = ('det', 'dino')
#: Bump when the defaults of stage 1 / stage 2 compute something else, so that
#: cached quantized stages are redone (2: percentile initialisation, the pow2
#: fold of stage 2).
QUANT_VERSION = 2
#: Bump when stage 2's weight quantization (percentile PTQ and GPLQ stage 2
#: rows) computes something else: only those stages are redone (1: GPTQ
#: rounding by default).
WEIGHT_PTQ_VERSION = 1
#: the row whose checkpoint is simulated (fake quant, FP32-sized)
REPQVIT_LABEL = 'RepQ-ViT W4A4 (faithful, simulated)'

SIZES = dict(  # full demo / --fast (CI) variant
    full=dict(det_train=400, det_val=100, cls_train=6000, cls_val=1000,
              dino_train=3000, dino_val=1000, dino_s1_train=1000,
              probe_train=500, probe_test=300,
              fp32_epochs=None, calib=64, calib_batches=8),
    fast=dict(det_train=16, det_val=8, cls_train=200, cls_val=50,
              dino_train=40, dino_val=20, dino_s1_train=None,
              probe_train=60, probe_test=20,
              fp32_epochs=1, calib=8, calib_batches=2),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'demo'))
    p.add_argument('--fast', action='store_true',
                   help='tiny variant for CI: few images, 1 FP32 epoch '
                   '(checks the pipeline, not accuracy)')
    p.add_argument('--only', choices=sorted(TASKS), default=None,
                   help='run one pipeline (default: ' + ', '.join(DEFAULT_TASKS)
                   + '; "cls" is the tiny DeiT trained from scratch)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--seeds', type=int, default=1,
                   help='quantized rows run for seeds SEED..SEED+N-1 '
                   '(calibration subset and stage-1 seed); tables show the '
                   'mean and range (default 1)')
    p.add_argument('--publish', metavar='MD', default=None,
                   help='also replace the generated block of this page (e.g. '
                   'docs/results.md) with the new tables and copy the chart '
                   'beside it')
    p.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                   help='pipelines (e.g. det, dino) run at once; each stage process '
                   'uses OMP_NUM_THREADS threads (default 1), so 2 suits 2 '
                   'cores (default: min(2, CPU count))')
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f'--jobs {args.jobs}: give 1 or more')
    if args.seeds < 1:
        p.error(f'--seeds {args.seeds}: give 1 or more')
    if args.publish and not osp.isfile(args.publish):
        p.error(f'--publish {args.publish}: no such file (it must hold the '
                f'{BEGIN} / {END} markers)')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES['fast' if args.fast else 'full']
    os.makedirs(args.work_dir, exist_ok=True)
    t_all = time.time()
    tasks = list(DEFAULT_TASKS) if args.only is None else [args.only]
    jobs = min(args.jobs, len(tasks))

    def logger(task=None):
        tag = f' {task}' if task and jobs > 1 else ''
        return lambda m: print(  # noqa: E731
            f'[gplq_demo{tag} {time.strftime("%H:%M:%S")}] {m}', flush=True)

    log = logger()
    results = dict(date=time.strftime('%Y-%m-%d %H:%M'), seed=args.seed,
                   seeds=list(range(args.seed, args.seed + args.seeds)),
                   fast=args.fast, machine=_machine(), jobs=jobs, tasks={})
    if jobs > 1:
        log(f'running {" and ".join(tasks)} side by side ({jobs} jobs)')
    stop = threading.Event()  # set when a pipeline fails: the other stops
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {t: pool.submit(run_task, t, args, size, logger(t), stop)
                   for t in tasks}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            stop.set()
            failed = next(t for t, f in futures.items()
                          if f in done and f.exception())
            if len(tasks) > 1:
                log(f'{failed} pipeline failed; stopping the other after its '
                    'current step')
        errors = []
        for task in tasks:
            try:
                results['tasks'][task] = futures[task].result()
            except StageError as e:  # a stage's own failure: no traceback
                errors.append(f'[{task}] {e}')
    if errors:
        first = [e for e in errors if 'another demo pipeline failed' not in e]
        print('gplq_demo: error: ' + '\n'.join(first or errors),
              file=sys.stderr, flush=True)
        return 1
    results['wall_seconds'] = time.time() - t_all
    write_reports(results, args.work_dir, log)
    if args.publish:
        publish(args.work_dir, args.publish, log)
    log(f'demo finished in {results["wall_seconds"] / 60:.1f} min; '
        f'results in {args.work_dir}/results.md')
    return 0


def _machine() -> str:
    import platform
    return f'{platform.machine()}, {os.cpu_count()} CPU cores, Python ' \
           f'{platform.python_version()}'


def make_data(task: str, args, size: dict, log) -> str:
    from gplq_mm.demo import data
    root = osp.join(args.work_dir, 'data', task)
    t0 = time.time()
    if task == 'det':
        data.make_shapes_coco(root, size['det_train'], size['det_val'], 128,
                              args.seed)
    else:
        info = data.make_classification(root, size[f'{task}_train'],
                                        size[f'{task}_val'], seed=args.seed)
        log(f'classification data: {info.get("source")}')
    log(f'[{task}_data] ready in {time.time() - t0:.0f}s: {root}')
    return root.rstrip('/') + '/'


def pretrained_env(spec: dict, log) -> dict:
    """Environment that points the configs at converted pretrained weights
    (fetched and converted once, then cached)."""
    if spec.get('pretrained') != 'dinov2':
        return {}
    from gplq_mm.pretrained import dinov2
    try:
        return {'GPLQ_DINOV2': dinov2.ensure_checkpoint(log=log)}
    except dinov2.PretrainedError as e:
        raise TaskSkipped(f'DINOv2 weights unavailable: {e}') from e


class TaskSkipped(RuntimeError):
    """A pipeline that cannot run here (e.g. pretrained weights cannot be
    fetched); the demo says so and goes on with the others."""


def run_task(task: str, args, size: dict, log,
             stop: Optional[threading.Event] = None) -> dict:
    spec = TASKS[task]
    try:
        extra_env = pretrained_env(spec, log)
    except TaskSkipped as e:
        log(f'WARNING: skipping the {task} pipeline: {e}')
        return dict(skipped=str(e), metrics=[m[0] for m in spec['metrics']],
                    rows=[])
    root = make_data(task, args, size, log)
    wd = osp.join(args.work_dir, task)
    # One OpenMP thread per process unless the user chose otherwise: on small
    # VMs torch's default spin-waiting OpenMP pool made a detector step ~10x
    # slower than a single thread (measured here: 7.0 s vs 0.6 s).
    env = {spec['env']: root,
           'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'),
           **extra_env}
    r = StageRunner(wd, env=env, log=log, stop=stop)
    # Stage 1 (and direct QAT) train one epoch; on the real-pretrained
    # classifier that epoch runs on a smaller stratified draw from the same
    # training distribution (the test split is the same images), to keep the
    # demo within its time budget on 2 cores.
    r1 = r
    if size.get(f'{task}_s1_train'):
        from gplq_mm.demo import data
        s1_root = data.make_classification(
            osp.join(args.work_dir, 'data', f'{task}_s1'),
            size[f'{task}_s1_train'], size[f'{task}_val'],
            seed=args.seed)['root'].rstrip('/') + '/'
        r1 = StageRunner(wd, env=dict(env, **{spec['env']: s1_root}),
                         log=log, stop=stop)
    train, test = stock_tool(spec['pkg'], 'train'), stock_tool(spec['pkg'], 'test')
    # a stage is reused only if the sizes, seed and the config files it uses
    # are unchanged (the QAT config inherits the GPLQ one)
    # (the probe sizes are keyed by the probe stages alone)
    stage_size = {k: v for k, v in size.items() if not k.startswith('probe_')}
    key = dict(size=stage_size, fp32=_digest(spec['fp32']))
    # quantized stages also key on the numerics of the library's defaults
    qkey = dict(key, quant=QUANT_VERSION)
    gplq_key = dict(qkey, gplq=_digest(spec['gplq']))
    qat_key = dict(gplq_key, qat=_digest(spec['qat']))
    seeds = list(range(args.seed, args.seed + args.seeds))
    rows = []  # table rows (dicts from _row)

    def d(name):
        return osp.join(wd, name)

    def epochs_opt():
        return ['--cfg-options', f'train_cfg.max_epochs={size["fp32_epochs"]}'] \
            if size['fp32_epochs'] else []

    # 2. FP32: stock train, convert our own (trusted) checkpoint to a safe one,
    #    stock test
    from mmengine.config import Config
    fp32_epochs = size['fp32_epochs'] or Config.fromfile(spec['fp32']).train_cfg.max_epochs
    fp32_ckpt = osp.join(d('fp32'), f'epoch_{fp32_epochs}.pth')
    safe = osp.join(d('fp32'), 'fp32_safe.pth')
    st = r.run('fp32', [
        [PY, train, spec['fp32'], '--work-dir', d('fp32'), *epochs_opt()],
        [PY, CONVERT, fp32_ckpt, safe, '--trust'],
        [PY, test, spec['fp32'], safe, '--work-dir', d('fp32')],
    ], dict(key, seed=args.seed), dict(ckpt=safe))
    rows.append(_row('FP32', {args.seed: (st, r.test_metrics('fp32'), safe,
                                          spec['fp32'])}, spec))

    per_method = {}  # label -> {seed: (stage, metrics, ckpt, config)}

    def record(label, seed, runner, name, stage, ckpt, config):
        # each seed keeps its own config: stage 2 writes one per checkpoint
        # (the QwT blocks it kept differ between seeds)
        per_method.setdefault(label, {})[seed] = (
            stage, runner.test_metrics(name), ckpt, config)

    for s in seeds:
        calib = ['--calib-images', str(size['calib']), '--seed', str(s)]
        sfx = f'_s{s}'
        # 3. percentile PTQ (GPLQ's placement), with and without QwT
        for name, extra, label in (
                ('ptq', ['--no-qwt'], 'percentile PTQ W4A4'),
                ('ptq_qwt', [], 'percentile PTQ + QwT W4A4')):
            out = d(name + sfx)
            ck = osp.join(out, f'{name}_w4a4.pth')
            st = r.run(name + sfx, [
                [PY, QUANTIZE, spec['fp32'], safe, '--method', 'repq',
                 '--out-dir', out, '--name', name, *calib, *extra],
                [PY, test, osp.join(out, f'{name}_w4a4.py'), ck, '--work-dir',
                 out],
            ], dict(qkey, seed=s, weights=WEIGHT_PTQ_VERSION), dict(ckpt=ck))
            record(label, s, r, name + sfx, st, ck,
                   osp.join(out, f'{name}_w4a4.py'))

        # 3b. RepQ-ViT as its public code does it, with its own calibration
        #     size (32 images for a classifier, 1 for a detector, one batch)
        out = d('repqvit' + sfx)
        ck = osp.join(out, 'repqvit_w4a4.pth')
        st = r.run('repqvit' + sfx, [
            [PY, QUANTIZE, spec['fp32'], safe, '--method', 'repqvit',
             '--out-dir', out, '--name', 'repqvit', '--seed', str(s)],
            [PY, test, osp.join(out, 'repqvit_w4a4.py'), ck, '--work-dir',
             out],
        ], dict(qkey, seed=s, method='repqvit'), dict(ckpt=ck))
        record(REPQVIT_LABEL, s, r, 'repqvit' + sfx, st, ck,
               osp.join(out, 'repqvit_w4a4.py'))

        calib_hook = ['--cfg-options', f'load_from={safe}',
                      f'custom_hooks.0.num_batches={size["calib_batches"]}',
                      f'randomness.seed={s}']
        # 4. direct W4A4 QAT, 1 epoch, converted exactly with its learned scales
        out = d('qat' + sfx)
        ck = osp.join(out, 'qat_w4a4.pth')
        st = r1.run('qat' + sfx, [
            [PY, train, spec['qat'], '--work-dir', out, *calib_hook],
            [PY, QUANTIZE, spec['qat'], osp.join(out, 'epoch_1.pth'), '--method',
             'qat', '--no-qwt', '--out-dir', out, '--name', 'qat', *calib],
            [PY, test, osp.join(out, 'qat_w4a4.py'), ck, '--work-dir', out],
        ], dict(qat_key, seed=s), dict(ckpt=ck))
        record('direct W4A4 QAT (1 epoch)', s, r1, 'qat' + sfx, st, ck,
               osp.join(out, 'qat_w4a4.py'))

        # 5. GPLQ stage 1
        out = d('gplq_w32a4' + sfx)
        w32a4 = osp.join(out, 'epoch_1.pth')
        st = r1.run('gplq_w32a4' + sfx, [
            [PY, train, spec['gplq'], '--work-dir', out, *calib_hook],
            [PY, test, spec['gplq'], w32a4, '--work-dir', out],
        ], dict(gplq_key, seed=s), dict(ckpt=w32a4))
        record('GPLQ W32A4 (Act-QAT)', s, r1, 'gplq_w32a4' + sfx, st, w32a4,
               spec['gplq'])

        # 6. GPLQ stage 2
        out = d('gplq_w4a4' + sfx)
        ck = osp.join(out, 'gplq_w4a4.pth')
        st = r.run('gplq_w4a4' + sfx, [
            [PY, QUANTIZE, spec['gplq'], w32a4, '--out-dir', out, '--name',
             'gplq', *calib],
            [PY, test, osp.join(out, 'gplq_w4a4.py'), ck, '--work-dir', out],
        ], dict(gplq_key, seed=s, weights=WEIGHT_PTQ_VERSION), dict(ckpt=ck))
        record('GPLQ W4A4 (+QwT)', s, r, 'gplq_w4a4' + sfx, st, ck,
               osp.join(out, 'gplq_w4a4.py'))
    for label, runs in per_method.items():
        rows.append(_row(label, runs, spec))

    if spec.get('probe'):
        _probe_rows(r, rows, args, size, key)
    return dict(metrics=[m[0] for m in spec['metrics']], rows=rows,
                data=root, seeds=seeds)


def _probe_rows(r, rows, args, size, key) -> None:
    """The paper's Table 1 protocol: a linear probe on the frozen features
    of every row, on downstream sets that no stage trains on."""
    ds_root = osp.join(args.work_dir, 'data', 'downstream')
    for row in rows:
        probes = {}
        for s, run in row['runs'].items():
            name = 'probe_' + osp.basename(osp.dirname(run['checkpoint']))
            out = osp.join(r.work_dir, name, 'probe.json')
            r.run(name, [[PY, PROBE, run['config'], run['checkpoint'],
                          '--data-root', ds_root, '--num-train',
                          str(size['probe_train']), '--num-test',
                          str(size['probe_test']), '--out', out]],
                  dict(key, seed=s, ckpt=run['checkpoint'],
                       mtime=osp.getmtime(run['checkpoint']),
                       probe=[size['probe_train'], size['probe_test']]),
                  dict(out=out))
            with open(out) as f:
                probes[s] = json.load(f)
            run['downstream'] = probes[s]
        sets = [k for k in next(iter(probes.values())) if k != 'average']
        row['downstream'] = {
            n: _stats([p[n]['top1'] if n != 'average' else p[n]
                       for p in probes.values()]) for n in sets + ['average']}


def _digest(path: str) -> str:
    import hashlib
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _stats(vals) -> dict:
    vals = [float(v) for v in vals]
    return dict(mean=sum(vals) / len(vals), min=min(vals), max=max(vals),
                n=len(vals))


def _row(label, runs, spec) -> dict:
    """One table row: per-seed metrics (``runs``: {seed: (stage, metrics,
    checkpoint, config)}) and their mean and range."""
    out = {}
    for s, (stage, metrics, ckpt, config) in runs.items():
        vals = {}
        for name, key in spec['metrics']:
            if key not in metrics:
                raise StageError(f'{label}: the stock test script printed no '
                                 f'{key} (got {sorted(metrics)})')
            vals[name] = metrics[key]
        out[s] = dict(vals, seconds=stage.seconds,
                      peak_rss_mib=stage.peak_rss_mib,
                      checkpoint_mib=osp.getsize(ckpt) / 2**20,
                      checkpoint=ckpt, config=config, cached=stage.cached)
    first = next(iter(out.values()))
    row = dict(method=label, runs=out, **{k: first[k] for k in (
        'seconds', 'peak_rss_mib', 'checkpoint_mib', 'checkpoint', 'cached')})
    for name, _ in spec['metrics']:
        st = _stats([v[name] for v in out.values()])
        row[name] = st['mean']
        row[f'{name} range'] = (st['min'], st['max'])
    return row


def _fmt(row: dict, col: str) -> str:
    lo, hi = row.get(f'{col} range', (row[col], row[col]))
    return f'{row[col]:.3f}' if lo == hi else \
        f'{row[col]:.3f} [{lo:.3f}, {hi:.3f}]'


def write_reports(results: dict, work_dir: str, log) -> None:
    seeds = results.get('seeds', [results['seed']])
    md = [f'# GPLQ demo results ({results["date"]}, {results["machine"]}, '
          f'seed{"s" if len(seeds) > 1 else ""} '
          f'{", ".join(map(str, seeds))}{", --fast" if results["fast"] else ""})',
          '']
    if len(seeds) > 1:
        md += ['Quantized rows: mean over the seeds [min, max]; a seed sets the '
               'calibration subset and the stage-1 run. FP32 is one model.', '']
    for task, res in results['tasks'].items():
        if res.get('skipped'):
            md += [f'## {task}', '', f'Skipped: {res["skipped"]}', '']
            continue
        cols = res['metrics']
        head = ['method', *cols, 'stage time (s)', 'stage peak RSS (MiB)',
                'checkpoint (MiB)']
        md += [f'## {task}', '', '| ' + ' | '.join(head) + ' |',
               '|' + '---|' * len(head)]
        for row in res['rows']:
            md.append('| ' + ' | '.join(
                [row['method']] + [_fmt(row, c) for c in cols] +
                [f'{row["seconds"]:.0f}', f'{row["peak_rss_mib"]:.0f}',
                 f'{row["checkpoint_mib"]:.2f}']) + ' |')
        md.append('')
        if res['rows'] and 'downstream' in res['rows'][0]:
            sets = list(res['rows'][0]['downstream'])
            md += [f'### {task}: downstream linear probes (frozen features, '
                   'top-1 %; sets no stage trains on)', '',
                   '| method | ' + ' | '.join(sets) + ' |',
                   '|' + '---|' * (len(sets) + 1)]
            for row in res['rows']:
                ds = row['downstream']
                md.append('| ' + row['method'] + ' | ' + ' | '.join(
                    f'{ds[n]["mean"]:.2f}' + (
                        '' if ds[n]['n'] == 1 else
                        f' [{ds[n]["min"]:.2f}, {ds[n]["max"]:.2f}]')
                    for n in sets) + ' |')
            md.append('')
    side = (f'; {" and ".join(results["tasks"])} ran side by side, one core '
            'each' if results.get('jobs', 1) > 1 else '')
    md.append(f'Total wall time: {results["wall_seconds"] / 60:.1f} min '
              f'(cached stages count the time they took when they ran{side}).')
    text = '\n'.join(md)
    print(text, flush=True)
    with open(osp.join(work_dir, 'results.md'), 'w') as f:
        f.write(text + '\n')
    with open(osp.join(work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, osp.join(work_dir, 'results.png'))
    log(f'wrote {work_dir}/results.{{md,json,png}}')


BEGIN = '<!-- BEGIN tables written by tools/gplq_demo.py --publish -->'
END = '<!-- END tables written by tools/gplq_demo.py --publish -->'


def publish(work_dir: str, page: str, log) -> None:
    """Replace the generated block of ``page`` with ``results.md`` and copy
    ``results.png`` beside it; the hand-written text around stays."""
    import shutil
    text = open(page).read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f'gplq_demo: error: {page} has no {BEGIN} ... {END} '
                         'block to replace')
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tables = open(osp.join(work_dir, 'results.md')).read().strip()
    with open(page, 'w') as f:
        f.write(f'{head}{BEGIN}\n{tables}\n{END}{tail}')
    shutil.copyfile(osp.join(work_dir, 'results.png'),
                    osp.join(osp.dirname(page), 'results.png'))
    log(f'published the tables to {page}')


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tasks = [(t, r) for t, r in results['tasks'].items() if r['rows']]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)),
                             squeeze=False)
    for (task, res), (ax1, ax2) in zip(tasks, axes):
        metric = res['metrics'][0]
        names = [r['method'] for r in res['rows']]
        vals = [r[metric] for r in res['rows']]
        ax1.barh(names[::-1], vals[::-1], color='tab:blue')
        ax1.set_xlabel(metric)
        ax1.set_title(f'{task}: {metric} per method (stock test script)')
        for r in res['rows']:
            ax2.scatter(r['seconds'], r[metric], s=40)
            ax2.annotate(r['method'], (r['seconds'], r[metric]), fontsize=7)
        ax2.set_xlabel('stage wall time (s, 2 CPU cores)')
        ax2.set_ylabel(metric)
        ax2.set_title(f'{task}: accuracy vs quantization time')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
