"""End-to-end GPLQ demo on data the project generates, every method side by side.

    python tools/gplq_demo.py [--work-dir work_dirs/demo] [--fast] [--only det|cls]
                              [--jobs N]

Stages (each a subprocess through the *stock* OpenMMLab scripts, cached in
``--work-dir`` so that a re-run is fast):

  1. generate data (COCO-format shapes for Mask R-CNN; Fashion-MNIST or a
     generated fallback for the classifier)
  2. train the FP32 models (stock tools/train.py)
  3. RepQ-ViT-style W4A4 PTQ, without and with QwT   (tools/gplq_quantize.py --method repq)
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

TASKS = {
    'det': dict(
        pkg='mmdet',
        fp32=osp.join(REPO, 'configs/demo/mask-rcnn_swin-tiny_fpn_shapes.py'),
        gplq=osp.join(REPO, 'configs/demo/gplq_mask-rcnn_swin-tiny_fpn_shapes_w32a4.py'),
        qat=osp.join(REPO, 'configs/demo/qat_mask-rcnn_swin-tiny_fpn_shapes_w4a4.py'),
        metrics=[('box AP', 'coco/bbox_mAP'), ('mask AP', 'coco/segm_mAP')],
        env='GPLQ_DEMO_SHAPES'),
    'cls': dict(
        pkg='mmpretrain',
        fp32=osp.join(REPO, 'configs/demo/deit-tiny_fashionmnist.py'),
        gplq=osp.join(REPO, 'configs/demo/gplq_deit-tiny_fashionmnist_w32a4.py'),
        qat=osp.join(REPO, 'configs/demo/qat_deit-tiny_fashionmnist_w4a4.py'),
        metrics=[('top-1', 'accuracy/top1')],
        env='GPLQ_DEMO_CLS'),
}

SIZES = dict(  # full demo / --fast (CI) variant
    full=dict(det_train=400, det_val=100, cls_train=6000, cls_val=1000,
              fp32_epochs=None, calib=64, calib_batches=8),
    fast=dict(det_train=16, det_val=8, cls_train=200, cls_val=50,
              fp32_epochs=1, calib=8, calib_batches=2),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work-dir', default=osp.join(REPO, 'work_dirs', 'demo'))
    p.add_argument('--fast', action='store_true',
                   help='tiny variant for CI: few images, 1 FP32 epoch '
                   '(checks the pipeline, not accuracy)')
    p.add_argument('--only', choices=['det', 'cls'], default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                   help='pipelines (det, cls) run at once; each stage process '
                   'uses OMP_NUM_THREADS threads (default 1), so 2 suits 2 '
                   'cores (default: min(2, CPU count))')
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f'--jobs {args.jobs}: give 1 or more')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    size = SIZES['fast' if args.fast else 'full']
    os.makedirs(args.work_dir, exist_ok=True)
    t_all = time.time()
    tasks = ['det', 'cls'] if args.only is None else [args.only]
    jobs = min(args.jobs, len(tasks))

    def logger(task=None):
        tag = f' {task}' if task and jobs > 1 else ''
        return lambda m: print(  # noqa: E731
            f'[gplq_demo{tag} {time.strftime("%H:%M:%S")}] {m}', flush=True)

    log = logger()
    results = dict(date=time.strftime('%Y-%m-%d %H:%M'), seed=args.seed,
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
        info = data.make_classification(root, size['cls_train'],
                                        size['cls_val'], seed=args.seed)
        log(f'classification data: {info.get("source")}')
    log(f'[{task}_data] ready in {time.time() - t0:.0f}s: {root}')
    return root.rstrip('/') + '/'


def run_task(task: str, args, size: dict, log,
             stop: Optional[threading.Event] = None) -> dict:
    spec = TASKS[task]
    root = make_data(task, args, size, log)
    wd = osp.join(args.work_dir, task)
    # One OpenMP thread per process unless the user chose otherwise: on small
    # VMs torch's default spin-waiting OpenMP pool made a detector step ~10x
    # slower than a single thread (measured here: 7.0 s vs 0.6 s).
    env = {spec['env']: root,
           'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    r = StageRunner(wd, env=env, log=log, stop=stop)
    train, test = stock_tool(spec['pkg'], 'train'), stock_tool(spec['pkg'], 'test')
    # a stage is reused only if the sizes, seed and the config files it uses
    # are unchanged (the QAT config inherits the GPLQ one)
    base_key = dict(size=size, seed=args.seed, fp32=_digest(spec['fp32']))
    key = base_key
    gplq_key = dict(base_key, gplq=_digest(spec['gplq']))
    qat_key = dict(gplq_key, qat=_digest(spec['qat']))
    rows = []

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
    ], key, dict(ckpt=safe))
    rows.append(_row('FP32', st, r.test_metrics('fp32'), safe, spec))

    calib = ['--calib-images', str(size['calib']), '--seed', str(args.seed)]
    # 3. RepQ-ViT-style PTQ, with and without QwT
    for name, extra, label in (('ptq', ['--no-qwt'], 'PTQ (RepQ-ViT-style) W4A4'),
                               ('ptq_qwt', [], 'PTQ + QwT W4A4')):
        out = d(name)
        ck = osp.join(out, f'{name}_w4a4.pth')
        st = r.run(name, [
            [PY, QUANTIZE, spec['fp32'], safe, '--method', 'repq', '--out-dir',
             out, '--name', name, *calib, *extra],
            [PY, test, osp.join(out, f'{name}_w4a4.py'), ck, '--work-dir', out],
        ], key, dict(ckpt=ck))
        rows.append(_row(label, st, r.test_metrics(name), ck, spec))

    calib_hook = ['--cfg-options', f'load_from={safe}',
                  f'custom_hooks.0.num_batches={size["calib_batches"]}']
    # 4. direct W4A4 QAT, 1 epoch, converted exactly with its learned scales
    out = d('qat')
    ck = osp.join(out, 'qat_w4a4.pth')
    st = r.run('qat', [
        [PY, train, spec['qat'], '--work-dir', out, *calib_hook],
        [PY, QUANTIZE, spec['qat'], osp.join(out, 'epoch_1.pth'), '--method',
         'qat', '--no-qwt', '--out-dir', out, '--name', 'qat', *calib],
        [PY, test, osp.join(out, 'qat_w4a4.py'), ck, '--work-dir', out],
    ], qat_key, dict(ckpt=ck))
    rows.append(_row('direct W4A4 QAT (1 epoch)', st, r.test_metrics('qat'), ck,
                     spec))

    # 5. GPLQ stage 1
    out = d('gplq_w32a4')
    w32a4 = osp.join(out, 'epoch_1.pth')
    st = r.run('gplq_w32a4', [
        [PY, train, spec['gplq'], '--work-dir', out, *calib_hook],
        [PY, test, spec['gplq'], w32a4, '--work-dir', out],
    ], gplq_key, dict(ckpt=w32a4))
    rows.append(_row('GPLQ W32A4 (Act-QAT)', st, r.test_metrics('gplq_w32a4'),
                     w32a4, spec))

    # 6. GPLQ stage 2
    out = d('gplq_w4a4')
    ck = osp.join(out, 'gplq_w4a4.pth')
    st = r.run('gplq_w4a4', [
        [PY, QUANTIZE, spec['gplq'], w32a4, '--out-dir', out, '--name', 'gplq',
         *calib],
        [PY, test, osp.join(out, 'gplq_w4a4.py'), ck, '--work-dir', out],
    ], gplq_key, dict(ckpt=ck))
    rows.append(_row('GPLQ W4A4 (+QwT)', st, r.test_metrics('gplq_w4a4'), ck,
                     spec))
    return dict(metrics=[m[0] for m in spec['metrics']], rows=rows,
                data=root)


def _digest(path: str) -> str:
    import hashlib
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _row(label, stage, metrics, ckpt, spec) -> dict:
    vals = {}
    for name, key in spec['metrics']:
        if key not in metrics:
            raise StageError(f'{label}: the stock test script printed no '
                               f'{key} (got {sorted(metrics)})')
        vals[name] = metrics[key]
    return dict(method=label, **vals, seconds=stage.seconds,
                peak_rss_mib=stage.peak_rss_mib,
                checkpoint_mib=osp.getsize(ckpt) / 2**20, checkpoint=ckpt,
                cached=stage.cached)


def write_reports(results: dict, work_dir: str, log) -> None:
    md = [f'# GPLQ demo results ({results["date"]}, {results["machine"]}, '
          f'seed {results["seed"]}{", --fast" if results["fast"] else ""})', '']
    for task, res in results['tasks'].items():
        cols = res['metrics']
        head = ['method', *cols, 'stage time (s)', 'stage peak RSS (MiB)',
                'checkpoint (MiB)']
        md += [f'## {task}', '', '| ' + ' | '.join(head) + ' |',
               '|' + '---|' * len(head)]
        for row in res['rows']:
            md.append('| ' + ' | '.join(
                [row['method']] + [f'{row[c]:.3f}' for c in cols] +
                [f'{row["seconds"]:.0f}', f'{row["peak_rss_mib"]:.0f}',
                 f'{row["checkpoint_mib"]:.2f}']) + ' |')
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


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tasks = list(results['tasks'].items())
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
