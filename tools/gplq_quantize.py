"""GPLQ stage 2: quantize the weights of a W32A4 model and fit QwT.

    python tools/gplq_quantize.py CONFIG CHECKPOINT --out-dir work_dirs/x \
        [--method gplq|repq|qat] [--calib-images N] [--w-bits 4] [--no-qwt]
    python <mmdet or mmpretrain>/tools/test.py work_dirs/x/<name>_w4a4.py \
        work_dirs/x/<name>_w4a4.pth

Methods (gplq, repq and qat write the same integer W4A4 form; all are
evaluated the same way):
  gplq  CONFIG is the stage-1 config, CHECKPOINT its W32A4 output (the
        activation scales come from Act-QAT).
  repq  RepQ-ViT-style PTQ baseline: CHECKPOINT is an FP32 checkpoint; the
        activation scales are calibrated (percentile) on the calibration
        images.  CONFIG may be a plain mmdet/mmpretrain config (it is wrapped
        with GPLQModel's default quantizer placement) or a stage-1 config.
  repqvit  RepQ-ViT as its public code does it (gplq_mm/ptq/repqvit.py):
        CHECKPOINT is an FP32 checkpoint; asymmetric grids, post-LayerNorm
        inputs per channel then reparameterized to per tensor, calibration in
        one sequential forward of all --calib-images (default RepQ-ViT's
        own: 32 for classifiers, 1 for detectors).  Writes a simulated (fake-quant) W4A4
        model: no QwT, no integer layers, no ONNX export.
  qat   direct-W4A4-QAT baseline: CHECKPOINT comes from a config with
        ``quant.weight`` (weights fake-quantized during training); the learned
        weight scales are used instead of the clipping search.

The work is done by the library (gplq_mm.engine.stage2.quantize_checkpoint);
this script parses the arguments, starts the launcher, keeps the log file and
prints stage-2 errors as one line.
"""
import argparse
import os
import os.path as osp
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='stage-1 config (or a plain config for --method repq)')
    p.add_argument('checkpoint', help='W32A4 checkpoint (FP32 for --method repq)')
    p.add_argument('--out-dir', required=True, help='where the W4A4 config, '
                   'checkpoint and report are written')
    p.add_argument('--method', choices=['gplq', 'repq', 'repqvit', 'qat'],
                   default='gplq')
    p.add_argument('--calib-images', type=int, default=None,
                   help='calibration images from the training set (default: '
                   'the paper\'s 512; --method repqvit: RepQ-ViT\'s 32 for '
                   'classifiers, 1 for detectors)')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--seed', type=int, default=0, help='seed of the calibration subset')
    p.add_argument('--w-bits', type=int, default=4)
    p.add_argument('--no-qwt', action='store_true', help='skip QwT compensation')
    p.add_argument('--qwt-lambda', type=float, default=1e-2,
                   help='ridge lambda of the QwT fit (the bias is not regularised)')
    p.add_argument('--qwt-cache-gb', type=float, default=2.0,
                   help='memory for block inputs kept between QwT blocks, '
                   'so that a block\'s inputs come from the previous block '
                   'instead of a forward of the model up to it (0: none)')
    p.add_argument('--qwt-spill-dir', default=None, metavar='DIR',
                   help='write the block inputs/outputs that do not fit in '
                   '--qwt-cache-gb to a temporary folder in DIR (removed at '
                   'the end) instead of recomputing them; at 1333x800 '
                   'about 52 MB per image at Swin-T stage 0')
    p.add_argument('--clip-search', choices=['mse', 'minmax'], default='mse',
                   help='weight clipping range: MSE search over ratios, or abs-max')
    p.add_argument('--fold', choices=['pow2', 'full'], default='pow2',
                   help='pow2: split each activation scale into an integer shift '
                   'of the codes and a factor folded into the weight (default); '
                   'full: fold the whole activation scale into the weight')
    p.add_argument('--max-shift', type=int, default=4,
                   help='--fold pow2: largest code shift (4: shifted codes fit int8)')
    p.add_argument('--weight-rounding', choices=['nearest', 'gptq'],
                   default=None,
                   help='how codes are chosen on the searched weight grid: '
                   'GPTQ against the Gram matrix of each Linear layer\'s '
                   'calibration inputs (one extra forward per image; same '
                   'grid and integer layers; the default for gplq and repq), '
                   'or each weight to its nearest code (the default for qat '
                   'and repqvit)')
    p.add_argument('--calib-pipeline', choices=['test', 'train'], default='test',
                   help='pipeline for calibration images (test: no random augmentation)')
    p.add_argument('--act-observer', choices=['percentile', 'minmax'],
                   default='percentile', help='--method repq: activation calibration')
    p.add_argument('--name', default=None, help='output name (default: config name)')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='allow unsafe unpickling of CHECKPOINT (only for trusted files)')
    p.add_argument('--cfg-options', nargs='+', action=_DictAction, default={},
                   help='override config settings, as in tools/train.py')
    p.add_argument('--device', default='auto',
                   help='where stage 2 computes: auto (the GPU when one is '
                   'visible, else the CPU), cpu, cuda or cuda:N')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                   default='none')
    return p.parse_args(argv)


def _DictAction(*args, **kwargs):
    from mmengine.config import DictAction
    return DictAction(*args, **kwargs)


def fail(msg: str) -> None:
    sys.stderr.write(f'gplq_quantize: error: {msg}\n')
    sys.exit(2)


def shutdown_distributed(barrier: bool) -> None:
    """Tear the process group down before exit (``--launcher``).

    Left to interpreter shutdown, gloo's background threads race the exit and
    abort the process ("terminate called without an active exception") after
    all the work is done.  ``barrier``: wait for the other ranks first (a
    successful run: rank 0 may still be writing); a failing rank does not
    wait, so the others see the failure instead of hanging in a collective.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    from gplq_mm.ptq.export import OutputFiles, Stage2Error
    outputs = OutputFiles()
    ok = False
    try:
        try:
            code = quantize(args, outputs)
        except Stage2Error as e:
            fail(str(e))
        ok = True
        return code
    except BaseException:  # incl. SystemExit from fail(): undo, then re-raise
        outputs.undo()
        raise
    finally:
        shutdown_distributed(barrier=ok)


def options(args):
    from gplq_mm.ptq.export import Stage2Options
    return Stage2Options(
        method=args.method, calib_images=args.calib_images,
        batch_size=args.batch_size, seed=args.seed, w_bits=args.w_bits,
        qwt=not args.no_qwt, qwt_lambda=args.qwt_lambda,
        clip_search=args.clip_search, fold=args.fold,
        max_shift=args.max_shift, weight_rounding=args.weight_rounding,
        calib_pipeline=args.calib_pipeline,
        act_observer=args.act_observer,
        trust_checkpoint=args.trust_checkpoint, device=args.device,
        qwt_cache_gb=args.qwt_cache_gb, qwt_spill_dir=args.qwt_spill_dir)


def start_launcher(launcher: str) -> None:
    """gloo either way: stage 2's collectives are few and small (observer
    statistics, the float64 QwT sums, which stay on the CPU), and gloo
    reduces CPU tensors.

    With GPUs, mmengine's init_dist pins one per process (``--device auto``
    then computes there).  It fails on a CPU-only machine, so there
    torchrun's environment is used directly.  Every rank
    computes; only rank 0 touches --out-dir (it alone writes the outputs, the
    log, and undoes its own files if the run fails).
    """
    from mmengine.dist import init_dist
    if torch.cuda.is_available():
        init_dist(launcher, backend='gloo')
    elif launcher == 'pytorch':
        torch.distributed.init_process_group(backend='gloo')
    else:
        fail(f'--launcher {launcher} needs GPUs (mmengine pins one per '
             'process); on a CPU-only machine start the processes with '
             'torchrun and pass --launcher pytorch.')


def quantize(args, outputs) -> int:
    t_start = time.time()
    from mmengine.config import Config
    from mmengine.dist import is_main_process
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    from gplq_mm.engine.stage2 import quantize_checkpoint
    from gplq_mm.ptq.export import prepare_out_dir

    if not osp.isfile(args.config):
        fail(f'config {args.config} does not exist.')
    if not osp.isfile(args.checkpoint):
        fail(f'checkpoint {args.checkpoint} does not exist.')
    opts = options(args)
    opts.weight_config()  # option errors before anything starts
    if args.launcher != 'none':
        start_launcher(args.launcher)
    opts.torch_device()  # after the launcher pinned this rank's GPU
    if is_main_process():
        prepare_out_dir(args.out_dir, outputs)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    name = args.name or osp.splitext(osp.basename(args.config))[0]
    # the log is renamed to <name>_w4a4.log once everything is written
    log_path = osp.join(args.out_dir, f'{name}_w4a4.log')
    log_tmp = osp.join(args.out_dir, f'{name}_w4a4.tmp.log')
    if is_main_process():
        outputs.add_file(log_tmp)
    logger = MMLogger.get_instance(
        'gplq_quantize', log_file=log_tmp if is_main_process() else None)
    outputs.loggers.append(logger)
    log = logger.info

    summary = quantize_checkpoint(cfg, args.config, args.checkpoint,
                                  args.out_dir, name, opts, outputs, log,
                                  t_start)
    if summary is None:  # not rank 0
        return 0
    os.replace(log_tmp, log_path)  # the open handler follows the rename
    outputs.keep()  # success: keep everything
    log(f'wrote {summary["config"]}\n      {summary["checkpoint"]}  '
        f'({summary["w4a4_checkpoint_bytes"] / 2**20:.2f} MiB; source state '
        f'dict {summary["source_state_dict_bytes"] / 2**20:.2f} MiB FP32)\n'
        f'wall time {summary["wall_seconds"]:.1f}s, peak RSS '
        f'{summary["peak_rss_mib"]:.0f} MiB. Evaluate with the stock '
        f'tools/test.py {summary["config"]} {summary["checkpoint"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
