"""Stage 2 end to end: a W32A4 (or, for the PTQ baseline, FP32) checkpoint
in, a W4A4 config + checkpoint + JSON report out.

``tools/gplq_quantize.py`` is a thin shell over :func:`quantize_checkpoint`
(argument parsing, the launcher, the log file, and printing
:class:`~gplq_mm.ptq.export.Stage2Error` as one line).  The procedure itself
is library code: calibration (:mod:`gplq_mm.ptq.calib`), weight PTQ + QwT
(:mod:`gplq_mm.ptq.weight_ptq`) and the export (:mod:`gplq_mm.ptq.export`).
"""
import contextlib
import dataclasses
import json
import os.path as osp
import pickle
import resource
import time
from typing import Callable, List, Optional

import torch
from mmengine.dist import get_rank, is_main_process
from mmengine.registry import MODELS

import gplq_mm
from gplq_mm.engine.input_check import check_finite_inputs
from gplq_mm.engine.safe_checkpoint import (UnsafeCheckpointError,
                                            load_checkpoint_file)
from gplq_mm.models.checkpoint_keys import QUANT_KEY, has_quant_state
from gplq_mm.models.gplq_model import CheckpointMismatchError
from gplq_mm.ptq.calib import (build_calib_loader, calibrate_activations,
                               override_observers)
from gplq_mm.ptq.export import (OutputFiles, Stage2Error, Stage2Options,
                                add_gplq_import, atomic_write,
                                calibration_record, imports_gplq,
                                prepare_config, runner_model_cfg, state_bytes,
                                write_text, write_w4a4)
from gplq_mm.ptq.convert import integer_fold
from gplq_mm.ptq.repqvit import (REPQVIT_A_BITS, RepQViTError, repqvit_ptq,
                                 repqvit_quant)
from gplq_mm.ptq.weight_ptq import integer_layers, weight_ptq
from gplq_mm.quant import NonFiniteError, iter_weight_quantizers
from gplq_mm.utils import sha256


def load_source(model, checkpoint: str, config_path: str,
                trust: bool = False, skip_quant_state: bool = False):
    """Read ``checkpoint`` (safely unless ``trust``) and load it into
    ``model``; returns ``(checkpoint dict, its state dict)``.

    ``skip_quant_state``: leave out quantizer state (scales of a stage-1
    checkpoint, whose placement differs from RepQ-ViT's): it is recalibrated.
    """
    try:
        ckpt = load_checkpoint_file(checkpoint, trust=trust)
    except UnsafeCheckpointError as e:
        raise Stage2Error(str(e)) from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        msg = str(e)  # the safe loader's own message names the problem
        if trust:
            msg = (f'{checkpoint} is not a readable torch checkpoint '
                   f'(truncated or corrupted?): {e}')
        raise Stage2Error(msg) from None
    if not isinstance(ckpt, dict):
        raise Stage2Error(f'{checkpoint} holds a {type(ckpt).__name__}, not a '
                          'checkpoint dict (state_dict, meta).')
    sd = ckpt.get('state_dict', ckpt)
    try:
        # GPLQModel's load hook checks keys and shapes (CheckpointMismatchError
        # names them) before torch would raise its own size-mismatch error
        model.load_state_dict(
            {k: v for k, v in sd.items() if not QUANT_KEY.search(k)}
            if skip_quant_state else sd, strict=False)
    except CheckpointMismatchError as e:
        raise Stage2Error(f'{checkpoint} with config {config_path}: {e}') \
            from None
    return ckpt, sd


class Phases:
    """Wall time and memory of each phase of stage 2, for the JSON report.

    ``peak_rss_mib`` is the process's peak resident memory at the end of the
    phase (the kernel keeps only the peak so far, so it never decreases);
    on CUDA, ``peak_cuda_mib`` is the phase's own peak of allocated memory.
    """

    def __init__(self, device: torch.device, log: Callable[[str], None]):
        self.device, self.log, self.rows = device, log, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == 'cuda'
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.time()
        yield
        row = dict(seconds=time.time() - t0, peak_rss_mib=resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024)
        if cuda:
            row['peak_cuda_mib'] = \
                torch.cuda.max_memory_allocated(self.device) / 2**20
        self.rows[name] = row
        self.log(f'{name}: {row["seconds"]:.1f} s, peak RSS '
                 f'{row["peak_rss_mib"]:.0f} MiB' +
                 (f', CUDA peak {row["peak_cuda_mib"]:.0f} MiB'
                  if cuda else ''))


def quantize_checkpoint(cfg, config_path: str, checkpoint: str, out_dir: str,
                        name: str, opts: Stage2Options, outputs: OutputFiles,
                        log: Callable[[str], None],
                        t_start: Optional[float] = None) -> Optional[dict]:
    """Stage 2: quantize the weights of ``checkpoint`` and write
    ``<out_dir>/<name>_w4a4.{py,pth,json}``.

    Args:
        cfg: The loaded config of ``config_path`` (``--cfg-options`` merged,
            default scope set).
        opts: The stage-2 options.
        outputs: Files written are recorded there (removed on failure by
            the caller).
        log: Progress messages.

    Returns:
        The JSON report (rank 0), ``None`` on other ranks.

    Raises:
        Stage2Error: one-line message naming problem and fix.
    """
    t_start = time.time() if t_start is None else t_start
    w_cfg = opts.weight_config()
    device = opts.torch_device()
    phases = Phases(device, log)
    prepare_config(cfg, opts.method, config_path)
    opts = dataclasses.replace(
        opts, calib_images=opts.resolved_calib_images(cfg))
    repqvit = opts.method == 'repqvit'
    if repqvit:  # RepQ-ViT's own placement, calibration and grids
        cfg.model.quant = repqvit_quant(REPQVIT_A_BITS, per_channel=True)
        if opts.qwt:
            log('--method repqvit writes a simulated (fake-quant) model: no '
                'QwT, no integer layers.')
    with phases('load'):
        model = MODELS.build(runner_model_cfg(cfg))
        ckpt, sd = load_source(model, checkpoint, config_path,
                               opts.trust_checkpoint, skip_quant_state=repqvit)
        # forward passes, calibration and the integer layers run on
        # ``device`` (the data preprocessor moves each batch there); the QwT
        # sums stay float64 on the CPU (QwTSums.update copies each chunk of
        # rows there)
        model.to(device)
    log(f'stage 2 computes on {device}')
    if opts.method in ('gplq', 'qat') and not model.all_calibrated():
        raise Stage2Error(
            f'{checkpoint} has no activation scales (an FP32 checkpoint?). '
            'Run stage 1 (Act-QAT) first, or use --method repq for the PTQ '
            'baseline.')
    if opts.method in ('repq', 'repqvit') and has_quant_state(sd):
        log(f'--method {opts.method}: the checkpoint already has activation scales; '
            'they are recalibrated from scratch (PTQ baseline).')
    if opts.method == 'qat' and \
            not any(True for _ in iter_weight_quantizers(model)):
        raise Stage2Error(
            '--method qat needs a checkpoint trained with quant.weight '
            '(direct W4A4 QAT); this config has no weight quantizers.')

    try:
        # RepQ-ViT calibrates in one forward of the whole calibration set
        loader = build_calib_loader(
            cfg, opts.calib_images,
            opts.calib_images if repqvit else opts.batch_size, opts.seed,
            opts.calib_pipeline)
    except ValueError as e:  # --calib-images out of range
        raise Stage2Error(str(e)) from None
    except FileNotFoundError as e:
        raise Stage2Error(
            f'calibration data not found: {e}. Stage 2 reads its images from '
            "the config's train_dataloader; point it at your copy, e.g. "
            '--cfg-options train_dataloader.dataset.data_root=DIR/') from None
    calib_record = calibration_record(loader, opts.seed)
    log(f'calibration set: {opts.calib_images} images (seed {opts.seed}, '
        f'{opts.calib_pipeline} pipeline), {len(loader)} batches on rank '
        f'{get_rank()}; indices {calib_record["indices"][:8]}'
        f'{" ..." if opts.calib_images > 8 else ""}')

    # calibration batches only (no training step here): one isfinite each
    def full_forward(batch):
        data = model.data_preprocessor(batch, False)
        check_finite_inputs(data, 'calibration')
        model(**data, mode='tensor')

    def backbone_forward(batch):
        data = model.data_preprocessor(batch, False)
        check_finite_inputs(data, 'calibration')
        model.model.backbone(data['inputs'])

    calib_seconds = 0.0
    try:
        if repqvit:
            model.eval()  # as RepQ-ViT: no drop-path/dropout while calibrating
            batch = next(iter(loader))  # the whole calibration set
            t_cal = time.time()
            with phases('calibration'):
                counts = repqvit_ptq(model.model, lambda: full_forward(batch),
                                     opts.w_bits, log)
            calib_seconds = time.time() - t_cal
            # the written config evaluates the reparameterized placement (all
            # inputs per tensor) in fake quantization; the checkpoint holds
            # the 4-bit weights as floats
            out_cfg = cfg.copy()
            out_cfg.model.quant = repqvit_quant(REPQVIT_A_BITS,
                                                per_channel=False)
            return _write_outputs(
                model, out_cfg, checkpoint, ckpt, sd, out_dir, name, opts,
                outputs, batch, calib_record, phases, device, t_start,
                meta=dict(a_bits=REPQVIT_A_BITS, simulated=True),
                report=lambda: dict(simulated=True, a_bits=REPQVIT_A_BITS,
                                    repqvit=counts,
                                    calib_seconds=calib_seconds))
        if opts.method == 'repq':
            override_observers(model, opts.act_observer)
            t_cal = time.time()
            with phases('calibration'):
                calibrate_activations(model, loader, full_forward, log,
                                      progress=is_main_process())
            calib_seconds = time.time() - t_cal

        with phases('weight_ptq'):  # clipping search, QwT (per block: report)
            report = weight_ptq(model.model, lambda: loader, backbone_forward,
                                w_cfg, qwt=opts.qwt, lam=opts.qwt_lambda,
                                use_learned_scale=opts.method == 'qat',
                                logger=log,
                                batch_ids=loader.batch_sampler.global_ids,
                                progress=is_main_process(),
                                cache_bytes=int(opts.qwt_cache_gb * 2**30),
                                spill_dir=opts.qwt_spill_dir,
                                full_run=full_forward)
    except NonFiniteError as e:  # in the images (named) or inside the model
        raise Stage2Error(f'{e} Nothing was written.') from None
    except RepQViTError as e:
        raise Stage2Error(f'--method repqvit: {e}') from None
    kept: List[str] = [b.name for b in report.blocks if b.kept]
    log(report.table())

    # -- outputs ---------------------------------------------------------------
    out_cfg = cfg.copy()
    # the fold the integer layers were built with (--method qat: the one its
    # weight quantizers trained on)
    fold = integer_fold(model)
    out_cfg.model.w4a4 = dict(w_bits=opts.w_bits, qwt_blocks=kept, fold=fold)
    return _write_outputs(
        model, out_cfg, checkpoint, ckpt, sd, out_dir, name, opts, outputs,
        next(iter(loader)), calib_record, phases, device, t_start,
        meta=dict(a_bits=model.quant_cfg.act.bits, fold=fold,
                  max_shift=w_cfg.max_shift if fold == 'pow2' else 0,
                  weight_rounding=w_cfg.rounding, qwt=opts.qwt,
                  qwt_lambda=opts.qwt_lambda, qwt_blocks=kept),
        report=lambda: dict(
            integer_layers=len(integer_layers(model.model)),
            qwt_blocks_kept=len(kept), qwt_blocks=len(report.blocks),
            calib_seconds=calib_seconds, ptq_seconds=report.seconds,
            report=report.to_dict()))


def _write_outputs(model, out_cfg, checkpoint, ckpt, sd, out_dir, name, opts,
                   outputs, check_batch, calib_record, phases, device,
                   t_start, meta: dict, report) -> Optional[dict]:
    """Write ``<name>_w4a4.{py,pth,json}`` (rank 0; ``None`` elsewhere).

    ``meta``: method-specific entries of the checkpoint's ``meta.gplq``;
    ``report()``: method-specific entries of the JSON report."""
    out_cfg.load_from = None
    if not imports_gplq(out_cfg):  # the stock test.py needs it
        add_gplq_import(out_cfg)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ck_meta = dict(
        gplq=dict(method=opts.method, w_bits=opts.w_bits, **meta,
                  calib_images=opts.calib_images, calib_seed=opts.seed,
                  calib_pipeline=opts.calib_pipeline,
                  source_checkpoint=osp.abspath(checkpoint),
                  source_sha256=sha256(checkpoint),
                  gplq_mm_version=gplq_mm.__version__),
        dataset_meta=ckpt.get('meta', {}).get('dataset_meta'))
    if not is_main_process():
        return None
    cfg_path = outputs.add_file(osp.join(out_dir, f'{name}_w4a4.py'))
    ckpt_path = outputs.add_file(osp.join(out_dir, f'{name}_w4a4.pth'))
    json_path = outputs.add_file(osp.join(out_dir, f'{name}_w4a4.json'))
    write_w4a4(model, out_cfg, state, ck_meta, cfg_path, ckpt_path,
               check_batch, phase=phases)
    summary = dict(config=cfg_path, checkpoint=ckpt_path, method=opts.method,
                   time=time.strftime('%Y-%m-%d %H:%M:%S'),
                   checkpoint_sha256=sha256(ckpt_path),
                   calibration=dict(calib_record,
                                    pipeline=opts.calib_pipeline),
                   w_bits=opts.w_bits, device=str(device),
                   wall_seconds=time.time() - t_start,
                   peak_rss_mib=resource.getrusage(
                       resource.RUSAGE_SELF).ru_maxrss / 1024,
                   phases=phases.rows,
                   source_checkpoint_bytes=osp.getsize(checkpoint),
                   source_state_dict_bytes=state_bytes(sd),
                   w4a4_checkpoint_bytes=osp.getsize(ckpt_path),
                   w4a4_state_dict_bytes=state_bytes(state), **report())
    atomic_write(json_path,
                 lambda p: write_text(p, json.dumps(summary, indent=1)))
    return summary
