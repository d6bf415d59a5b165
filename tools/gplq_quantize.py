"""GPLQ stage 2: quantize the weights of a W32A4 model and fit QwT.

    python tools/gplq_quantize.py CONFIG CHECKPOINT --out-dir work_dirs/x \
        [--method gplq|repq|qat] [--calib-images 512] [--w-bits 4] [--no-qwt]
    python <mmdet or mmpretrain>/tools/test.py work_dirs/x/<name>_w4a4.py \
        work_dirs/x/<name>_w4a4.pth

Methods (all write the same integer W4A4 form, evaluated the same way):
  gplq  CONFIG is the stage-1 config, CHECKPOINT its W32A4 output (the
        activation scales come from Act-QAT).
  repq  RepQ-ViT-style PTQ baseline: CHECKPOINT is an FP32 checkpoint; the
        activation scales are calibrated (percentile) on the calibration
        images.  CONFIG may be a plain mmdet/mmpretrain config (it is wrapped
        with GPLQModel's default quantizer placement) or a stage-1 config.
  qat   direct-W4A4-QAT baseline: CHECKPOINT comes from a config with
        ``quant.weight`` (weights fake-quantized during training); the learned
        weight scales are used instead of the clipping search.
"""
import argparse
import hashlib
import io
import json
import os
import os.path as osp
import pickle
import resource
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='stage-1 config (or a plain config for --method repq)')
    p.add_argument('checkpoint', help='W32A4 checkpoint (FP32 for --method repq)')
    p.add_argument('--out-dir', required=True, help='where the W4A4 config, '
                   'checkpoint and report are written')
    p.add_argument('--method', choices=['gplq', 'repq', 'qat'], default='gplq')
    p.add_argument('--calib-images', type=int, default=512,
                   help='calibration images from the training set (paper: 512)')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--seed', type=int, default=0, help='seed of the calibration subset')
    p.add_argument('--w-bits', type=int, default=4)
    p.add_argument('--no-qwt', action='store_true', help='skip QwT compensation')
    p.add_argument('--qwt-lambda', type=float, default=1e-2,
                   help='ridge lambda of the QwT fit (the bias is not regularised)')
    p.add_argument('--clip-search', choices=['mse', 'minmax'], default='mse',
                   help='weight clipping range: MSE search over ratios, or abs-max')
    p.add_argument('--calib-pipeline', choices=['test', 'train'], default='test',
                   help='pipeline for calibration images (test: no random augmentation)')
    p.add_argument('--act-observer', choices=['percentile', 'minmax'],
                   default='percentile', help='--method repq: activation calibration')
    p.add_argument('--name', default=None, help='output name (default: config name)')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='allow unsafe unpickling of CHECKPOINT (only for trusted files)')
    p.add_argument('--cfg-options', nargs='+', action=_DictAction, default={},
                   help='override config settings, as in tools/train.py')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                   default='none')
    return p.parse_args(argv)


def _DictAction(*args, **kwargs):
    from mmengine.config import DictAction
    return DictAction(*args, **kwargs)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def state_bytes(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values()
               if torch.is_tensor(v))


def fail(msg: str) -> None:
    sys.stderr.write(f'gplq_quantize: error: {msg}\n')
    sys.exit(2)


class Cleanup:
    """What this run created in --out-dir, removed again if it fails.

    A failed run leaves --out-dir as it found it: no log, no partial outputs
    (pre-existing files are never touched), and no directory it created.
    """

    def __init__(self):
        self.files, self.dirs, self.loggers = [], [], []

    def add_file(self, path: str) -> str:
        if not osp.exists(path):
            self.files.append(path)
        return path

    def undo(self) -> None:
        for logger in self.loggers:  # close the log file before removing it
            for h in list(logger.handlers):
                if getattr(h, 'baseFilename', None):
                    h.close()
                    logger.removeHandler(h)
        for path in self.files:
            if osp.exists(path):
                os.remove(path)
        for path in reversed(self.dirs):  # deepest first; only if empty
            if osp.isdir(path) and not os.listdir(path):
                os.rmdir(path)


def check_out_dir(path: str, cleanup: Cleanup) -> None:
    missing, parent = [], osp.abspath(path)
    while not osp.exists(parent):
        missing.append(parent)
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        fail(f'--out-dir {path}: {parent} exists and is not a directory; pass '
             'a directory path (it is created if missing).')
    try:
        os.makedirs(path, exist_ok=True)
        cleanup.dirs.extend(reversed(missing))
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        fail(f'--out-dir {path} is not writable ({e.strerror}); choose another '
             'directory.')


def runner_model_cfg(cfg):
    """The model config as mmengine's Runner builds it.

    The Runner merges the config's top-level ``data_preprocessor`` (where
    mmpretrain configs keep mean/std) into the model config; building
    ``cfg.model`` alone would calibrate on unnormalised images while the stock
    test script evaluates normalised ones.  Given to the wrapped model, as
    GPLQModel does with it.
    """
    model = cfg.model.copy()
    dp = cfg.get('data_preprocessor')
    if dp is not None:
        inner = model.model.copy()
        inner.setdefault('data_preprocessor', dp.copy())
        model.model = inner
    return model


def imports_gplq(cfg) -> bool:
    """Whether the config's ``custom_imports`` import gplq_mm."""
    imports = (cfg.get('custom_imports') or {}).get('imports') or []
    if isinstance(imports, str):
        imports = [imports]
    return 'gplq_mm' in imports


def add_gplq_import(cfg) -> None:
    """Add gplq_mm to ``custom_imports``, keeping the config's own."""
    ci = dict(cfg.get('custom_imports') or {})
    imports = ci.get('imports') or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    ci['imports'] = imports + ['gplq_mm']
    ci.setdefault('allow_failed_imports', False)
    cfg.custom_imports = ci


def calibration_record(loader, seed: int) -> dict:
    """Indices (and image paths) of the whole calibration subset.

    ``loader`` is a :func:`build_calib_loader` loader: its dataset is the
    seeded ``Subset`` of every rank's images (the ranks split its batches).
    """
    ds, idx = loader.dataset.dataset, list(loader.dataset.indices)
    paths = []
    if hasattr(ds, 'get_data_info'):
        paths = [ds.get_data_info(i).get('img_path') for i in idx]
    return dict(seed=seed, indices=idx, images=paths)


def write_bytes(path: str, data: bytes) -> None:
    with open(path, 'wb') as f:
        f.write(data)


def atomic_write(path: str, write) -> None:
    """Write via a temporary file in the same directory, then rename."""
    root, ext = osp.splitext(path)
    tmp = f'{root}.tmp{ext}'  # keep the extension: Config.dump reads it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


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
    cleanup = Cleanup()
    ok = False
    try:
        code = quantize(args, cleanup)
        ok = True
        return code
    except BaseException:  # incl. SystemExit from fail(): undo, then re-raise
        cleanup.undo()
        raise
    finally:
        shutdown_distributed(barrier=ok)


def quantize(args, cleanup: Cleanup) -> int:
    t_start = time.time()
    from mmengine.config import Config
    from mmengine.dist import get_rank, init_dist, is_main_process
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_state_dict

    import gplq_mm
    from gplq_mm.engine.input_check import check_finite_inputs
    from gplq_mm.engine.safe_checkpoint import (UnsafeCheckpointError,
                                                load_checkpoint_file)
    from gplq_mm.models.checkpoint_keys import (CheckpointMismatchError,
                                                has_quant_state)
    from gplq_mm.models.gplq_model import GPLQModel
    from gplq_mm.ptq.calib import (build_calib_loader, calibrate_activations,
                                   override_observers)
    from gplq_mm.ptq.weight_ptq import integer_layers, weight_ptq
    from gplq_mm.quant import (NonFiniteError, WeightQuantConfig,
                               iter_weight_quantizers)

    if not osp.isfile(args.config):
        fail(f'config {args.config} does not exist.')
    if not osp.isfile(args.checkpoint):
        fail(f'checkpoint {args.checkpoint} does not exist.')
    if args.batch_size < 1:
        fail('--batch-size must be >= 1.')
    if args.qwt_lambda < 0:
        fail(f'--qwt-lambda {args.qwt_lambda}: the ridge lambda must be >= 0.')
    try:
        w_cfg = WeightQuantConfig(bits=args.w_bits, search=args.clip_search)
    except ValueError as e:
        fail(f'--w-bits {args.w_bits}: {e}')
    if args.launcher != 'none':
        # stage 2 computes on the CPU (QwT sums in float64): gloo either way.
        # mmengine's init_dist also pins a CUDA device, which fails on a
        # CPU-only machine, so there torchrun's environment is used directly.
        # Every rank computes; only rank 0 touches --out-dir (it alone writes
        # the outputs, the log, and undoes its own files if the run fails).
        if torch.cuda.is_available():
            init_dist(args.launcher, backend='gloo')
        elif args.launcher == 'pytorch':
            torch.distributed.init_process_group(backend='gloo')
        else:
            fail(f'--launcher {args.launcher} needs GPUs (mmengine pins one '
                 'per process); on a CPU-only machine start the processes '
                 'with torchrun and pass --launcher pytorch.')
    if is_main_process():
        check_out_dir(args.out_dir, cleanup)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    name = args.name or osp.splitext(osp.basename(args.config))[0]
    # the log is renamed to <name>_w4a4.log once everything is written
    log_path = osp.join(args.out_dir, f'{name}_w4a4.log')
    log_tmp = osp.join(args.out_dir, f'{name}_w4a4.tmp.log')
    if is_main_process():
        cleanup.add_file(log_tmp)
    logger = MMLogger.get_instance(
        'gplq_quantize', log_file=log_tmp if is_main_process() else None)
    cleanup.loggers.append(logger)
    log = logger.info

    if cfg.model.get('type') != 'GPLQModel':
        if args.method != 'repq':
            fail(f'{args.config} does not wrap its model with GPLQModel. '
                 f'--method {args.method} needs the stage-1 config the '
                 'checkpoint was trained with (see configs/gplq/); for the '
                 'PTQ baseline from an FP32 checkpoint use --method repq.')
        cfg.model = dict(type='GPLQModel', model=cfg.model)
        if not imports_gplq(cfg):
            add_gplq_import(cfg)
    elif not imports_gplq(cfg):
        # this tool imports gplq_mm itself; the stock scripts would not
        fail(f"{args.config} uses type='GPLQModel' but its custom_imports do "
             "not import gplq_mm: add the line `custom_imports = "
             "dict(imports=['gplq_mm'], allow_failed_imports=False)` to the "
             'config. Without it the stock tools/train.py and tools/test.py '
             '(and the W4A4 config written from it) fail with "GPLQModel is '
             'not in the model registry".')
    if cfg.model.get('w4a4'):
        fail(f'{args.config} is already a W4A4 config; pass the stage-1 '
             'config.')
    cfg.model.setdefault('quant', {})
    cfg.model.mimic = dict(enabled=False)  # no teacher needed in stage 2
    model: GPLQModel = MODELS.build(runner_model_cfg(cfg))

    try:
        ckpt = load_checkpoint_file(args.checkpoint,
                                    trust=args.trust_checkpoint)
    except UnsafeCheckpointError as e:
        fail(str(e))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        msg = str(e)  # the safe loader's own message names the problem
        if args.trust_checkpoint:
            msg = (f'{args.checkpoint} is not a readable torch checkpoint '
                   f'(truncated or corrupted?): {e}')
        fail(msg)
    if not isinstance(ckpt, dict):
        fail(f'{args.checkpoint} holds a {type(ckpt).__name__}, not a '
             'checkpoint dict (state_dict, meta).')
    sd = ckpt.get('state_dict', ckpt)
    try:
        # GPLQModel's load hook checks keys and shapes (CheckpointMismatchError
        # names them) before torch would raise its own size-mismatch error
        model.load_state_dict(sd, strict=False)
    except CheckpointMismatchError as e:
        fail(f'{args.checkpoint} with config {args.config}: {e}')
    if args.method in ('gplq', 'qat') and not model.all_calibrated():
        fail(f'{args.checkpoint} has no activation scales (an FP32 '
             'checkpoint?). Run stage 1 (Act-QAT) first, or use --method repq '
             'for the PTQ baseline.')
    if args.method == 'repq' and has_quant_state(sd):
        log('--method repq: the checkpoint already has activation scales; '
            'they are recalibrated from scratch (PTQ baseline).')
    if args.method == 'qat' and not any(True for _ in iter_weight_quantizers(model)):
        fail('--method qat needs a checkpoint trained with quant.weight '
             '(direct W4A4 QAT); this config has no weight quantizers.')

    try:
        loader = build_calib_loader(cfg, args.calib_images, args.batch_size,
                                    args.seed, args.calib_pipeline)
    except ValueError as e:  # --calib-images out of range
        fail(str(e))
    except FileNotFoundError as e:
        fail(f'calibration data not found: {e}. Stage 2 reads its images from '
             "the config's train_dataloader; point it at your copy, e.g. "
             '--cfg-options train_dataloader.dataset.data_root=DIR/')
    calib_record = calibration_record(loader, args.seed)
    log(f'calibration set: {args.calib_images} images (seed {args.seed}, '
        f'{args.calib_pipeline} pipeline), {len(loader)} batches on rank '
        f'{get_rank()}; indices {calib_record["indices"][:8]}'
        f'{" ..." if args.calib_images > 8 else ""}')

    # calibration batches only (no training step here): one isfinite each
    def full_forward(batch):
        data = model.data_preprocessor(batch, False)
        check_finite_inputs(data, 'calibration')
        model(**data, mode='tensor')

    def backbone_forward(batch):
        data = model.data_preprocessor(batch, False)
        check_finite_inputs(data, 'calibration')
        model.model.backbone(data['inputs'])

    try:
        if args.method == 'repq':
            override_observers(model, args.act_observer)
            calibrate_activations(model, loader, full_forward, log)

        report = weight_ptq(model.model, lambda: loader, backbone_forward,
                            w_cfg, qwt=not args.no_qwt, lam=args.qwt_lambda,
                            use_learned_scale=args.method == 'qat',
                            logger=log,
                            batch_ids=loader.batch_sampler.global_ids)
    except NonFiniteError as e:  # in the images (named) or inside the model
        fail(f'{e} Nothing was written.')
    kept = [b.name for b in report.blocks if b.kept]
    log(report.table())

    # -- outputs ---------------------------------------------------------------
    out_cfg = cfg.copy()
    out_cfg.model.w4a4 = dict(w_bits=args.w_bits, qwt_blocks=kept)
    out_cfg.load_from = None
    if not imports_gplq(out_cfg):  # the stock test.py needs it
        add_gplq_import(out_cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    src_sd_bytes = state_bytes(sd)
    meta = dict(
        gplq=dict(method=args.method, w_bits=args.w_bits,
                  a_bits=model.quant_cfg.act.bits, qwt=not args.no_qwt,
                  qwt_lambda=args.qwt_lambda, qwt_blocks=kept,
                  calib_images=args.calib_images, calib_seed=args.seed,
                  calib_pipeline=args.calib_pipeline,
                  source_checkpoint=osp.abspath(args.checkpoint),
                  source_sha256=sha256(args.checkpoint),
                  gplq_mm_version=gplq_mm.__version__),
        dataset_meta=ckpt.get('meta', {}).get('dataset_meta'))
    if not is_main_process():
        return 0
    cfg_path = cleanup.add_file(osp.join(args.out_dir, f'{name}_w4a4.py'))
    ckpt_path = cleanup.add_file(osp.join(args.out_dir, f'{name}_w4a4.pth'))
    json_path = cleanup.add_file(osp.join(args.out_dir, f'{name}_w4a4.json'))
    # self-check: a model built from the written config must load the
    # checkpoint strictly and compute exactly what the converted model does
    atomic_write(cfg_path, lambda p: out_cfg.dump(p))
    # byte-reproducible: no wall-clock time in the file (it is in the JSON
    # report), and serialised to memory so that the zip archive's internal
    # name does not depend on the output file name
    buf = io.BytesIO()
    torch.save(dict(state_dict=state, meta=meta), buf)
    atomic_write(ckpt_path, lambda p: write_bytes(p, buf.getvalue()))
    del buf
    check = Config.fromfile(cfg_path)
    rebuilt = MODELS.build(runner_model_cfg(check))
    loaded = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    load_state_dict(rebuilt, loaded['state_dict'], strict=True)
    rebuilt.eval()
    batch = next(iter(loader))
    with torch.no_grad():
        a = model.model.extract_feat(model.data_preprocessor(batch, False)['inputs'])
        b = rebuilt.model.extract_feat(rebuilt.data_preprocessor(batch, False)['inputs'])
    a, b = (a if isinstance(a, (tuple, list)) else [a]), \
        (b if isinstance(b, (tuple, list)) else [b])
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    if diff > 1e-4:
        for p in (cfg_path, ckpt_path):
            os.remove(p)
        fail(f'self-check failed: the model rebuilt from {cfg_path} differs '
             f'from the converted model by {diff:.3g}; nothing written.')

    sizes = dict(source_checkpoint_bytes=osp.getsize(args.checkpoint),
                 source_state_dict_bytes=src_sd_bytes,
                 w4a4_checkpoint_bytes=osp.getsize(ckpt_path),
                 w4a4_state_dict_bytes=state_bytes(state))
    summary = dict(config=cfg_path, checkpoint=ckpt_path, method=args.method,
                   time=time.strftime('%Y-%m-%d %H:%M:%S'),
                   checkpoint_sha256=sha256(ckpt_path),
                   calibration=dict(calib_record,
                                    pipeline=args.calib_pipeline),
                   w_bits=args.w_bits, integer_layers=len(integer_layers(model.model)),
                   qwt_blocks_kept=len(kept), qwt_blocks=len(report.blocks),
                   wall_seconds=time.time() - t_start,
                   ptq_seconds=report.seconds,
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   **sizes, report=report.to_dict())
    atomic_write(json_path,
                 lambda p: open(p, 'w').write(json.dumps(summary, indent=1)))
    os.replace(log_tmp, log_path)  # the open handler follows the rename
    cleanup.files.clear()  # success: keep everything
    log(f'wrote {cfg_path}\n      {ckpt_path}  '
        f'({sizes["w4a4_checkpoint_bytes"] / 2**20:.2f} MiB; source state dict '
        f'{src_sd_bytes / 2**20:.2f} MiB FP32)\n'
        f'wall time {summary["wall_seconds"]:.1f}s, peak RSS '
        f'{summary["peak_rss_mib"]:.0f} MiB. Evaluate with the stock '
        f'tools/test.py {cfg_path} {ckpt_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
