#!/usr/bin/env python
"""Cost of stage 2 (``tools/gplq_quantize.py``) at real size: the COCO Mask
R-CNN Swin-T (``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``, random
weights, 6 classes) on 1333x800 calibration images.

For every ``--images`` count, with and without QwT, the stock stage-2 tool
runs in its own process (``--method repq``: activation calibration + weight
PTQ [+ QwT], from an FP32 checkpoint) and its JSON report gives the wall
time of the calibration and of the weight PTQ / QwT phase and the peak RSS.
The per-image cost is the slope between the smallest and the largest count
(the fixed cost of building and loading the model cancels), and is compared
with a plain FP32 forward of the whole detector on one image (``mode=
'tensor'``, median of 3, in this process, measured in the same run).  The
extrapolation to the paper's 512 images is ``fixed + 512 x per-image``.

Images: the project's generated shapes (``gplq_mm.demo.make_shapes_coco``,
800 px squares) resized to 1333x800 without keeping the ratio, so every
image is exactly the size COCO's test pipeline gives a 4:3 photo.

    OMP_NUM_THREADS=1 python tools/benchmark_stage2.py                # 4, 8 images (~25 min here)
    python tools/benchmark_stage2.py --images 2 4 --no-qwt-runs      # quicker
    python tools/benchmark_stage2.py --device cuda                   # on a GPU

Everything is written under ``--work-dir`` (data, config, checkpoint, the
stage-2 outputs, ``benchmark_stage2.json``).
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
CONFIG = '''# written by tools/benchmark_stage2.py
_base_ = '{base}'
data_root = '{data}/'
classes = {classes!r}
metainfo = dict(classes=classes)
model = dict(
    backbone=dict(init_cfg=None),  # random weights: nothing downloaded
    roi_head=dict(bbox_head=dict(num_classes={n}),
                  mask_head=dict(num_classes={n})))
# exactly 1333x800, the size COCO's test pipeline gives a 4:3 photo
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(1333, 800), keep_ratio=False),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=True, min_size=0)))
test_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
val_dataloader = test_dataloader
val_evaluator = dict(type='CocoMetric',
                     ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, nargs='+', default=[4, 8],
                   help='calibration image counts (at least two; default 4 8)')
    p.add_argument('--no-qwt-runs', action='store_true',
                   help='only the runs without QwT')
    p.add_argument('--qwt-runs-only', action='store_true',
                   help='only the runs with QwT')
    p.add_argument('--qwt-cache-gb', type=float, default=None,
                   help='stage 2 --qwt-cache-gb for the QwT runs (default: '
                   "the tool's); 0 recomputes every block input")
    p.add_argument('--qwt-spill-dir', default=None, metavar='DIR',
                   help='stage 2 --qwt-spill-dir for the QwT runs')
    p.add_argument('--device', default='cpu',
                   help='stage 2 --device, and where the FP32 forward runs')
    p.add_argument('--weight-rounding', choices=['nearest', 'gptq'],
                   default=None, help="gplq_quantize.py's --weight-rounding "
                   '(default: the tool\'s, gptq; nearest for the tables '
                   'measured before it)')
    p.add_argument('--work-dir', default='work_dirs/benchmark_stage2')
    p.add_argument('--timeout', type=int, default=3600,
                   help='seconds per stage-2 run')
    args = p.parse_args(argv)
    if len(set(args.images)) < 2 or min(args.images) < 1:
        p.error('--images needs at least two different counts >= 1')
    return args


def prepare(work: str):
    """Data, config and a random-weight FP32 checkpoint (reused if there)."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from gplq_mm.demo import SHAPES_CLASSES, make_shapes_coco
    data = osp.join(work, 'data')
    make_shapes_coco(data, num_train=64, num_val=1, img_size=800)
    cfg_path = osp.join(work, 'mask-rcnn_swin-t_1333x800.py')
    with open(cfg_path, 'w') as f:
        f.write(CONFIG.format(base=BASE, data=osp.abspath(data),
                              classes=tuple(SHAPES_CLASSES),
                              n=len(SHAPES_CLASSES)))
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmdet')
    ckpt = osp.join(work, 'fp32_random.pth')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    if not osp.exists(ckpt):
        torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    else:
        model.load_state_dict(torch.load(ckpt, map_location='cpu',
                                         weights_only=True)['state_dict'])
    return cfg, cfg_path, ckpt, model


def fp32_forward_seconds(cfg, model, device: str, repeats: int = 3):
    """Median wall time of one FP32 ``mode='tensor'`` forward (1 image)."""
    import torch
    from gplq_mm.ptq.calib import build_calib_loader
    model.to(device).eval()
    batch = next(iter(build_calib_loader(cfg, 1, 1, 0, 'test')))
    times = []
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        shape = tuple(data['inputs'].shape)
        for _ in range(repeats + 1):  # the first one warms up
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(**data, mode='tensor')
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), shape


def stage2(cfg_path, ckpt, out, images, qwt, device, timeout,
           cache_gb=None, spill_dir=None, rounding=None):
    cmd = [sys.executable, osp.join(REPO, 'tools', 'gplq_quantize.py'),
           cfg_path, ckpt, '--method', 'repq', '--out-dir', out,
           '--calib-images', str(images), '--batch-size', '1', '--name', 'b']
    if rounding is not None:
        cmd += ['--weight-rounding', rounding]
    if device != 'cpu':
        cmd += ['--device', device]
    if not qwt:
        cmd.append('--no-qwt')
    elif cache_gb is not None:
        cmd += ['--qwt-cache-gb', str(cache_gb)]
    if qwt and spill_dir is not None:
        cmd += ['--qwt-spill-dir', spill_dir]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'stage 2 failed ({" ".join(cmd)}):\n'
                           f'{proc.stderr[-3000:]}')
    with open(osp.join(out, 'b_w4a4.json')) as f:
        rep = json.load(f)
    return dict(images=images, qwt=qwt, process_s=time.time() - t,
                wall_s=rep['wall_seconds'], calib_s=rep['calib_seconds'],
                ptq_s=rep['ptq_seconds'], peak_rss_mib=rep['peak_rss_mib'],
                qwt_blocks_kept=rep['qwt_blocks_kept'],
                forwards=rep['report'].get('forwards'),
                phases=rep.get('phases'),
                block_s=[b.get('seconds') for b in rep['report']['blocks']])


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    import torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    cfg, cfg_path, ckpt, model = prepare(args.work_dir)
    fwd, shape = fp32_forward_seconds(cfg, model, args.device)
    print(f'FP32 forward of the whole detector, input {shape}: {fwd:.2f} s',
          flush=True)
    del model
    runs = []
    kinds = (False, ) if args.no_qwt_runs else (True, ) \
        if args.qwt_runs_only else (False, True)
    for qwt in kinds:
        for n in sorted(set(args.images)):
            out = osp.join(args.work_dir, f'n{n}_{"qwt" if qwt else "noqwt"}')
            r = stage2(cfg_path, ckpt, out, n, qwt, args.device, args.timeout,
                       args.qwt_cache_gb, args.qwt_spill_dir,
                       args.weight_rounding)
            runs.append(r)
            print(f'{n:4d} images, QwT {"yes" if qwt else "no "}: wall '
                  f'{r["wall_s"]:.0f} s (calibration {r["calib_s"]:.0f} s, '
                  f'weight PTQ{" + QwT" if qwt else ""} {r["ptq_s"]:.0f} s), '
                  f'peak RSS {r["peak_rss_mib"]:.0f} MiB', flush=True)
    lo, hi = min(args.images), max(args.images)
    summary = {}
    for qwt in sorted({r['qwt'] for r in runs}):
        a = next(r for r in runs if r['qwt'] == qwt and r['images'] == lo)
        b = next(r for r in runs if r['qwt'] == qwt and r['images'] == hi)
        per = (b['wall_s'] - a['wall_s']) / (hi - lo)
        fixed = a['wall_s'] - lo * per
        summary['qwt' if qwt else 'no_qwt'] = dict(
            per_image_s=per, fixed_s=fixed, per_image_vs_fp32=per / fwd,
            extrapolated_512_h=(fixed + 512 * per) / 3600,
            peak_ratio=b['peak_rss_mib'] / a['peak_rss_mib'])
    if 'qwt' in summary and 'no_qwt' in summary:
        summary['qwt_vs_no_qwt'] = summary['qwt']['per_image_s'] / \
            summary['no_qwt']['per_image_s']
    for k, v in summary.items():
        print(k, json.dumps(v) if isinstance(v, dict) else f'{v:.2f}')
    res = dict(device=args.device, fp32_forward_s=fwd, input_shape=shape,
               weight_rounding=args.weight_rounding or 'gptq (default)',
               qwt_cache_gb=args.qwt_cache_gb,
               qwt_spill_dir=args.qwt_spill_dir,
               threads=torch.get_num_threads(), runs=runs, summary=summary,
               date=time.strftime('%Y-%m-%d %H:%M'))
    path = osp.join(args.work_dir, 'benchmark_stage2.json')
    with open(path, 'w') as f:
        json.dump(res, f, indent=1)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
