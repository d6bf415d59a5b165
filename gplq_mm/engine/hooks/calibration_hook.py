"""Stage-1 calibration: initialise activation scales and the PCA teacher."""
import hashlib
import time
from typing import Optional

import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.utils.data import DataLoader

from gplq_mm.engine.input_check import (NonFiniteInputError,
                                        batch_image_names,
                                        check_finite_inputs)
from gplq_mm.models.checkpoint_keys import has_quant_state
from gplq_mm.models.gplq_model import GPLQModel
from gplq_mm.models.mimic import (PCAAccumulator, capture_output,
                                  make_teacher, pool_feature)
from gplq_mm.ptq.calib import ActCalibration
from gplq_mm.quant import (NonFiniteError, QState, iter_act_quantizers,
                           set_act_state)
from .exact_resume_hook import GPLQExactResumeHook
from .safe_checkpoint_hook import GPLQSafeCheckpointHook

TEACHER_KEY = 'gplq_teacher'


def unwrap(model) -> GPLQModel:
    model = model.module if is_model_wrapper(model) else model
    if not isinstance(model, GPLQModel):
        raise TypeError(
            'GPLQCalibrationHook needs model=dict(type="GPLQModel", ...) in the '
            f'config, got {type(model).__name__}. See configs/gplq/ for '
            'examples.')
    return model


def calibration_loader(runner) -> DataLoader:
    """A fresh loader over the training set for calibration.

    Iterating ``runner.train_dataloader`` itself would leave items in the
    buckets of mmdet's ``AspectRatioBatchSampler`` and change the first
    training epoch; this loader has its own seeded ``DefaultSampler`` (rank
    sharded under DDP) and the same dataset, batch size and collate function.
    """
    src = runner.train_dataloader
    batch_size = src.batch_size or runner.cfg.train_dataloader.batch_size
    sampler = DefaultSampler(src.dataset, shuffle=True, seed=runner.seed)
    return DataLoader(src.dataset, batch_size=batch_size, sampler=sampler,
                      num_workers=src.num_workers, collate_fn=src.collate_fn)


@HOOKS.register_module()
class GPLQCalibrationHook(Hook):
    """Calibrate activation scales (and fit the PCA teacher) in ``before_train``.

    Runs after ``load_from`` has put the FP32 weights in place (mmengine loads
    checkpoints after ``before_run`` hooks, before ``before_train``).  Scales
    are initialised from ``num_batches`` training batches with each
    quantizer's observer (by default 0.1th/99.9th percentiles per channel,
    1st/99th per token; ``observer='minmax'`` is the paper's), all-reduced
    across ranks.  If the scales were loaded from a
    checkpoint (resume, or a W32A4 start), nothing is recalibrated.  At test
    time this hook does nothing: scales come only from the checkpoint.

    With ``mimic`` enabled in the model, the teacher (frozen FP32 copy) and
    the PCA basis of its features are built from the same batches, and are
    saved in / restored from checkpoints (key ``gplq_teacher``) for resume.

    Reliability checks: every calibration batch must be finite (an image with
    NaN/inf is named by its path, before any scale is set); calibrating a
    model into which no checkpoint was loaded is refused (stage 1 starts from
    FP32 weights); ``--resume`` from a checkpoint without activation scales
    (e.g. the FP32 file, which mmpretrain's ``train.py`` resumes from when
    ``--cfg-options load_from=...`` is given with ``--resume``) is refused.
    The log line after calibration ends with a SHA-256 digest of all scales,
    to compare runs.

    Args:
        num_batches: Training batches for scale calibration.
        log_interval: Log progress every this many batches.
        require_checkpoint: Refuse to calibrate when no checkpoint was loaded
            (``load_from`` / ``--resume``).  Set False only if the model gets
            its weights otherwise (e.g. ``init_cfg``).
    """

    priority = 'HIGH'  # before EMA & co. snapshot the model in before_train

    def __init__(self, num_batches: int = 16, log_interval: int = 4,
                 require_checkpoint: bool = True):
        if num_batches < 1:
            raise ValueError(f'GPLQCalibrationHook(num_batches={num_batches}): '
                             'calibration needs at least one batch.')
        self.num_batches = num_batches
        self.log_interval = max(1, log_interval)
        self.require_checkpoint = require_checkpoint
        self._restored_teacher: Optional[dict] = None
        self._loaded = False

    # -- checkpoint plumbing (resume) ----------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = unwrap(runner.model)
        if model.teacher is not None:
            mean, comps = model.pca
            checkpoint[TEACHER_KEY] = dict(
                state_dict=model.teacher.state_dict(), pca_mean=mean.cpu(),
                pca_components=comps.cpu())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = True
        if getattr(runner, '_resume', False):
            self._check_resume_source(runner, checkpoint)
        if TEACHER_KEY in checkpoint:
            self._restored_teacher = checkpoint[TEACHER_KEY]

    @staticmethod
    def _check_resume_source(runner, checkpoint: dict) -> None:
        """A resume must start from a checkpoint of a GPLQ training run."""
        sd = checkpoint.get('state_dict', checkpoint)
        meta = checkpoint.get('meta') or {}
        has_scales = has_quant_state(sd)
        if has_scales and 'iter' in meta and 'epoch' in meta:
            return
        src = getattr(runner, '_load_from', None)
        what = 'holds no activation scales (an FP32 checkpoint?)' \
            if not has_scales else "has no 'epoch'/'iter' in its meta"
        raise RuntimeError(
            f'GPLQ: --resume is resuming from {src or "a checkpoint"}, which '
            f'{what}, so it is not a checkpoint of this stage-1 run. '
            "mmpretrain's tools/train.py applies --cfg-options after "
            '--resume: with `--cfg-options load_from=FP32.pth`, `--resume` '
            'resumes from the FP32 file. When resuming, drop load_from '
            '(`--resume` alone takes the latest checkpoint of the work_dir) '
            'or name the checkpoint: `--resume WORK_DIR/iter_N.pth`.')

    # -- calibration ---------------------------------------------------------
    def before_train(self, runner) -> None:
        model = unwrap(runner.model)
        logger = runner.logger
        if not any(isinstance(h, GPLQSafeCheckpointHook) for h in runner.hooks):
            # else the stock test.py (torch>=2.6, weights_only=True) cannot
            # read the checkpoints this run is about to write
            raise RuntimeError(
                'Add dict(type="GPLQSafeCheckpointHook") to custom_hooks: '
                'without it the checkpoints of this run hold mmengine objects '
                'that torch.load(weights_only=True) in tools/test.py refuses.')
        if not any(isinstance(h, GPLQExactResumeHook) for h in runner.hooks):
            # configs written before the resume hook was split out list only
            # GPLQSafeCheckpointHook: say so instead of resuming inexactly
            logger.warning(
                'GPLQ: GPLQExactResumeHook is not registered, so --resume from '
                'a checkpoint saved inside an epoch restarts that epoch with '
                'other random states (not bitwise exact). Add '
                'default_hooks = dict(exact_resume=dict('
                'type="GPLQExactResumeHook")) to the config.')
        if model.all_calibrated():
            logger.info('GPLQ: activation scales were loaded from the '
                        'checkpoint; skipping calibration.')
            need_scales = False
        else:
            need_scales = True
        if need_scales and self.require_checkpoint and not self._loaded:
            raise RuntimeError(
                'GPLQ calibration: no checkpoint was loaded, so the model '
                'holds randomly initialised weights. Stage 1 starts from an '
                'FP32 checkpoint: pass `--cfg-options load_from=FP32.pth`. '
                '(`--resume` with no checkpoint in the work_dir yet loads '
                'nothing: start the run again without --resume.) If the '
                'model gets its weights otherwise (init_cfg), set '
                'GPLQCalibrationHook(require_checkpoint=False).')
        need_pca = model.mimic_on and model.teacher is None
        if need_pca and self._restored_teacher is not None:
            saved = self._restored_teacher
            teacher = make_teacher(model)
            teacher.load_state_dict(saved['state_dict'])
            model.set_teacher(teacher, saved['pca_mean'], saved['pca_components'])
            logger.info('GPLQ: restored the FP32 teacher and PCA basis '
                        f'(k={saved["pca_components"].shape[1]}) from the '
                        'checkpoint.')
            need_pca = False
        if need_scales or need_pca:
            self._run(runner, model, need_scales, need_pca)

    @torch.no_grad()
    def _run(self, runner, model: GPLQModel, need_scales: bool,
             need_pca: bool) -> None:
        logger = runner.logger
        n_scale = self.num_batches if need_scales else 0
        n_pca = model.mimic_cfg.num_batches if need_pca else 0
        total = max(n_scale, n_pca)
        teacher = make_teacher(model) if need_pca else None
        # direct-QAT baseline: weight scales are searched on the folded
        # weight (W diag(s), or W diag(t) with fold='pow2'), so only once s
        # is calibrated (in calib.end)
        calib = ActCalibration(model.model, search_weights=True)
        if need_scales:
            calib.begin()
        else:
            set_act_state(model.model, QState.OFF)
        feats, acc = {}, None
        hook = capture_output(model.feature_module(), feats, 'f') \
            if need_pca else None
        was_training = model.training
        model.eval()
        t0 = time.time()
        seen = 0
        logger.info(f'GPLQ calibration: {n_scale} batches for activation '
                    f'scales, {n_pca} for the PCA teacher basis.')
        try:
            for i, data in enumerate(calibration_loader(runner)):
                if i >= total:
                    break
                if need_scales and i == n_scale:
                    calib.pause()  # PCA batches only
                data = model.data_preprocessor(data, False)
                where = f'GPLQ calibration, batch {i + 1}'
                check_finite_inputs(data, where)
                try:
                    model(**data, mode='tensor')
                except NonFiniteError as e:  # an observer saw NaN/inf inside
                    raise NonFiniteInputError(
                        f'{where} (images: '
                        f'{", ".join(batch_image_names(data))}): {e}'
                    ) from None
                if need_pca:
                    f = pool_feature(feats.pop('f'))
                    if acc is None:
                        acc = PCAAccumulator(f.shape[1])
                    acc.update(f)
                seen = i + 1
                if seen % self.log_interval == 0 or seen == total:
                    logger.info(f'GPLQ calibration: batch {seen}/{total} '
                                f'({time.time() - t0:.1f}s)')
        finally:
            if hook is not None:
                hook.remove()
        if seen < total:
            logger.warning(f'GPLQ calibration: the train dataloader had only '
                           f'{seen} batches (asked for {total}).')
        if seen == 0:
            raise RuntimeError('GPLQ calibration saw no batch: the training '
                               'dataloader is empty.')
        if need_scales:
            calib.end(QState.LEARNING)
            self._log_scales(model, logger)
        else:
            set_act_state(model.model, QState.LEARNING)
        if need_pca:
            acc.all_reduce()
            mean, comps, share = acc.basis(model.mimic_cfg.var_ratio,
                                           model.mimic_cfg.multiple)
            model.set_teacher(teacher, mean, comps)
            logger.info(f'GPLQ mimic: PCA on {acc.n} teacher features of dim '
                        f'{acc.dim}: k={comps.shape[1]} components explain '
                        f'{100 * share:.1f}% of the variance.')
        model.train(was_training)
        logger.info(f'GPLQ calibration done in {time.time() - t0:.1f}s.')

    @staticmethod
    def _log_scales(model: GPLQModel, logger) -> None:
        scales = torch.cat([q.scale.detach().flatten()
                            for _, q in iter_act_quantizers(model.model)])
        bad = int((~torch.isfinite(scales) | (scales <= 0)).sum())
        if bad:
            raise RuntimeError(f'GPLQ calibration produced {bad} non-finite or '
                               'non-positive scales; check the input data.')
        n = sum(1 for _ in iter_act_quantizers(model.model))
        logger.info(f'GPLQ: calibrated {n} activation quantizers '
                    f'({scales.numel()} scales; min {scales.min():.3g}, '
                    f'median {scales.median():.3g}, max {scales.max():.3g}; '
                    f'sha256 {scales_digest(model)}).')


def scales_digest(model: GPLQModel) -> str:
    """First 16 hex digits of the SHA-256 of every activation scale (in
    module order, float32): equal digests mean bitwise-equal scales."""
    h = hashlib.sha256()
    for name, q in iter_act_quantizers(model.model):
        h.update(name.encode())
        h.update(q.scale.detach().float().cpu().contiguous().numpy()
                 .tobytes())
    return h.hexdigest()[:16]
