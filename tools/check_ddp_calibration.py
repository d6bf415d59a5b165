"""Check that stage-1 calibration under DDP equals single-process calibration.

Runs a stage-1 config through a real mmengine Runner
(``Runner.from_cfg(cfg).train()``). Right after ``GPLQCalibrationHook``
calibrated the model in ``before_train``, it records every activation scale,
the PCA basis of the mimic teacher (if enabled) and which images each rank
calibrated on; then training goes on (``--max-iters N`` shortens it), so
DDP training of the calibrated model is exercised too::

    # reference, one process
    python tools/check_ddp_calibration.py CONFIG --out single.pth \\
        --cfg-options custom_hooks.0.num_batches=8
    # two processes (on CPU: gloo), each calibrating on half the batches
    torchrun --nproc_per_node 2 tools/check_ddp_calibration.py CONFIG \\
        --out ddp.pth --cfg-options custom_hooks.0.num_batches=4
    python tools/check_ddp_calibration.py --compare single.pth ddp.pth

The observers all-reduce their statistics (min/max, percentile histograms,
PCA sums), so with the same images the scales must be *identical*. Keep
``num_batches x world size`` equal, and on detectors use one image per GPU:
Mask R-CNN's RoI head feeds only the first 100 RoIs of a *batch* to the mask
head, so the mask head's calibration data depend on how images are grouped
into batches (and CPU conv kernels may round an image's features differently
at another position in a batch, ~1e-7; ``--atol`` allows for that).

CPU-only machines: the stock ``tools/train.py --launcher pytorch`` cannot run
there, because mmengine 0.10's ``init_dist`` calls
``torch.cuda.set_device(LOCAL_RANK)`` unconditionally, and because
``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to
``DistributedDataParallel``, which torch rejects for CPU modules. Without a
GPU this script therefore initialises the gloo process group itself (mmengine
then skips ``init_dist``) and sets
``model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None)``.
With GPUs, mmengine's own launcher path is used unchanged.
"""
import argparse
import os
import os.path as osp
import sys

import torch


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', help='stage-1 config')
    p.add_argument('--out', help='where to write the record (rank 0)')
    p.add_argument('--work-dir', help='work dir of the run')
    p.add_argument('--max-iters', type=int, default=None,
                   help='train only this many iterations after calibration '
                   '(iteration-based loop, no validation); default: the '
                   "config's schedule")
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, as in tools/train.py')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                   help='compare two records and exit (0: equal)')
    p.add_argument('--atol', type=float, default=0.0,
                   help='tolerance of --compare (default: exact)')
    args = p.parse_args(argv)
    if not args.compare and not (args.config and args.out):
        p.error('give CONFIG and --out, or --compare A B')
    return args


def _setup_distributed(cfg) -> int:
    """Prepare ``cfg`` for the launcher this process was started with."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        cfg.launcher = 'none'
        return 1
    cfg.launcher = 'pytorch'
    if not torch.cuda.is_available():
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend='gloo')
        cfg.setdefault('env_cfg', {})
        cfg.env_cfg['dist_cfg'] = dict(backend='gloo')
        wrapper = dict(cfg.get('model_wrapper_cfg') or {})
        wrapper.setdefault('type', 'MMDistributedDataParallel')
        wrapper['device_ids'] = None  # CPU module: no device ids
        cfg.model_wrapper_cfg = wrapper
    return world


def _short_schedule(cfg, n: int) -> None:
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=n,
                         val_interval=n + 1)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=n)
    cfg.log_processor = dict(type='LogProcessor', by_epoch=False)


def run(args) -> int:
    from mmengine.config import Config
    from mmengine.dist import all_gather_object, get_rank
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from gplq_mm.quant import iter_act_quantizers

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    world = _setup_distributed(cfg)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg.work_dir = args.work_dir or osp.join(
        'work_dirs', 'check_ddp_calibration', f'{name}_x{world}')
    if args.max_iters is not None:
        _short_schedule(cfg, args.max_iters)

    runner = Runner.from_cfg(cfg)
    model = getattr(runner.model, 'module', runner.model)
    seen, state = [], dict(calibrating=True)

    def record_inputs(module, fargs, kwargs):
        if state['calibrating']:
            for s in kwargs.get('data_samples') or []:
                seen.append(s.metainfo.get('img_path'))

    handle = model.register_forward_pre_hook(record_inputs, with_kwargs=True)
    record = {}

    def scales():
        return {n: q.scale.detach().cpu().clone()
                for n, q in iter_act_quantizers(model.model)}

    class AfterCalibration(Hook):

        def before_train(self, runner) -> None:
            state['calibrating'] = False
            handle.remove()
            record['scales'] = scales()
            record['initialized'] = all(
                bool(q.initialized) for _, q in iter_act_quantizers(model.model))
            record['pca'] = None if model.pca is None else tuple(
                t.detach().cpu().clone() for t in model.pca)
            record['images_per_rank'] = all_gather_object(list(seen))
            everyone = all_gather_object(record['scales'])
            record['ranks_agree_after_calibration'] = all(
                all(torch.equal(s[k], record['scales'][k]) for k in s)
                for s in everyone)

    # LOW: after GPLQCalibrationHook (HIGH) has calibrated
    runner.register_hook(AfterCalibration(), priority='LOW')
    runner.train()
    final = scales()
    everyone = all_gather_object(final)
    record['ranks_agree_after_training'] = all(
        all(torch.equal(s[k], final[k]) for k in s) for s in everyone)
    record['world_size'] = world
    record['iters'] = runner.iter
    if get_rank() == 0:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        torch.save(record, args.out)
        n_img = sum(len(r) for r in record['images_per_rank'])
        print(f'check_ddp_calibration: {world} process(es) calibrated '
              f'{len(record["scales"])} quantizers on {n_img} images; '
              f'ranks agree after calibration: '
              f'{record["ranks_agree_after_calibration"]}, after '
              f'{runner.iter} training iterations: '
              f'{record["ranks_agree_after_training"]}; wrote {args.out}')
    _shutdown_distributed()
    return 0


def _shutdown_distributed() -> None:
    """Tear the gloo group down before exit.

    Leaving it to interpreter shutdown races gloo's background threads and
    aborts the process ("terminate called without an active exception"),
    after all the work is done.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def compare(path_a: str, path_b: str, atol: float = 0.0) -> int:
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    problems = []
    for r, p in ((a, path_a), (b, path_b)):
        if not r['initialized']:
            problems.append(f'{p}: some quantizers were not calibrated')
        if not (r['ranks_agree_after_calibration']
                and r['ranks_agree_after_training']):
            problems.append(f'{p}: the ranks disagree')
    imgs_a = sorted(i for r in a['images_per_rank'] for i in r)
    imgs_b = sorted(i for r in b['images_per_rank'] for i in r)
    if imgs_a != imgs_b:
        problems.append('the runs calibrated on different images: '
                        f'{len(imgs_a)} vs {len(imgs_b)}')
    if set(a['scales']) != set(b['scales']):
        problems.append('different quantizers')
    worst, bad = 0.0, []
    for k in sorted(set(a['scales']) & set(b['scales'])):
        d = float((a['scales'][k] - b['scales'][k]).abs().max())
        worst = max(worst, d)
        if d > atol:
            bad.append(k)
    if bad:
        problems.append(f'{len(bad)} scales differ (max |diff| {worst:.3g}), '
                        f'e.g. {", ".join(bad[:3])}')
    if (a['pca'] is None) != (b['pca'] is None):
        problems.append('only one run has a PCA basis')
    elif a['pca'] is not None:
        (mean_a, v_a), (mean_b, v_b) = a['pca'], b['pca']
        tol = max(atol, 1e-5)
        if not torch.allclose(mean_a, mean_b, rtol=0, atol=tol):
            problems.append('PCA means differ')
        if v_a.shape != v_b.shape:
            problems.append(f'PCA k differs: {v_a.shape[1]} vs {v_b.shape[1]}')
        elif not torch.allclose(v_a @ v_a.t(), v_b @ v_b.t(), rtol=0,
                                atol=tol):
            # compared as subspaces: eigenvector signs are arbitrary
            problems.append('PCA subspaces differ (expected only if the '
                            'basis is ill-conditioned, e.g. fewer feature '
                            'vectors than components)')
    print(f'compared {len(a["scales"])} quantizers '
          f'(world sizes {a["world_size"]} and {b["world_size"]}, '
          f'{len(imgs_a)} images): max |diff| {worst:.3g}')
    for p in problems:
        print('MISMATCH:', p)
    return 1 if problems else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare, atol=args.atol)
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
