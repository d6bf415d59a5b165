"""The pieces of stage 2's W4A4 export (what a W4A4 config, checkpoint and
report are, and how they are written); run end to end by
:func:`gplq_mm.engine.stage2.quantize_checkpoint`, which
``tools/gplq_quantize.py`` calls.

* :class:`Stage2Options` / :class:`Stage2Error`: the options and the
  one-line errors of stage 2;
* :func:`prepare_config`: wrap/check the config for a method;
* :func:`write_w4a4`: write config + checkpoint (byte-reproducible) and
  self-check them by rebuilding the model from the written config;
* :class:`OutputFiles`: what a run wrote, removed again if it fails.
"""
import contextlib
import io
import os
import os.path as osp
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class Stage2Error(Exception):
    """A stage-2 problem with a one-line message naming problem and fix."""


@dataclass
class Stage2Options:
    """What ``tools/gplq_quantize.py``'s options select (same defaults)."""
    method: str = 'gplq'  # gplq | repq | repqvit | qat
    calib_images: Optional[int] = None  # None: the method's own (below)
    batch_size: int = 4
    seed: int = 0
    w_bits: int = 4
    qwt: bool = True
    qwt_lambda: float = 1e-2
    clip_search: str = 'mse'
    fold: str = 'pow2'  # WeightQuantConfig.fold
    max_shift: int = 4
    # WeightQuantConfig.rounding; None: the method's own (resolved_rounding)
    weight_rounding: Optional[str] = None
    calib_pipeline: str = 'test'
    act_observer: str = 'percentile'
    trust_checkpoint: bool = False
    device: str = 'auto'  # auto | cpu | cuda | cuda:N
    qwt_cache_gb: float = 2.0  # block inputs kept between QwT blocks
    qwt_spill_dir: Optional[str] = None  # ... and beyond that, on disk

    def resolved_calib_images(self, cfg) -> int:
        """``calib_images``, or where unset the method's own default: the
        paper's 512; RepQ-ViT's 32 (classifiers) or 1 (detectors), which it
        forwards as one batch."""
        if self.calib_images is not None:
            return self.calib_images
        if self.method == 'repqvit':
            return 1 if cfg.get('default_scope') == 'mmdet' else 32
        return 512

    def resolved_rounding(self) -> str:
        """``weight_rounding``, or where unset: GPTQ for the weight PTQ of
        ``gplq`` and ``repq`` (chosen on a validation split: docs/ablation.md
        §8); nearest for ``qat`` (its codes are the trained ones) and
        ``repqvit`` (as RepQ-ViT's code)."""
        if self.weight_rounding is not None:
            return self.weight_rounding
        return 'nearest' if self.method in ('qat', 'repqvit') else 'gptq'

    def torch_device(self):
        """The device stage 2 computes on (Stage2Error if unusable).

        ``auto``: the current CUDA device where one is visible (the one
        ``--launcher`` pinned for this rank), else the CPU.
        """
        import torch
        want = self.device
        if want == 'auto':
            want = 'cuda' if torch.cuda.is_available() else 'cpu'
        try:
            dev = torch.device(want)
        except RuntimeError:
            raise Stage2Error(f'--device {self.device}: not a device; use '
                              'auto, cpu, cuda or cuda:N.') from None
        if dev.type not in ('cpu', 'cuda'):
            raise Stage2Error(f'--device {self.device}: stage 2 runs on cpu '
                              'or cuda.')
        if dev.type == 'cuda':
            if not torch.cuda.is_available():
                raise Stage2Error(
                    f'--device {self.device}: no CUDA device is visible '
                    '(torch.cuda.is_available() is False); use --device cpu.')
            if dev.index is None:
                dev = torch.device('cuda', torch.cuda.current_device())
            elif dev.index >= torch.cuda.device_count():
                raise Stage2Error(
                    f'--device {self.device}: only '
                    f'{torch.cuda.device_count()} CUDA device(s) visible.')
        return dev

    def weight_config(self):
        """The weight quantization config, checked (Stage2Error if not)."""
        from gplq_mm.quant import WeightQuantConfig
        if self.batch_size < 1:
            raise Stage2Error('--batch-size must be >= 1.')
        if not self.qwt_cache_gb >= 0:
            raise Stage2Error(f'--qwt-cache-gb {self.qwt_cache_gb}: use a '
                              'size >= 0 (0: no cache).')
        if self.qwt_spill_dir is not None and \
                not os.path.isdir(self.qwt_spill_dir):
            raise Stage2Error(f'--qwt-spill-dir {self.qwt_spill_dir}: not a '
                              'directory; create it or give an existing one.')
        if self.qwt_lambda < 0:
            raise Stage2Error(f'--qwt-lambda {self.qwt_lambda}: the ridge '
                              'lambda must be >= 0.')
        rounding = self.resolved_rounding()
        if rounding == 'gptq' and self.method in ('qat', 'repqvit'):
            raise Stage2Error(
                f'--weight-rounding gptq does not apply to --method '
                f'{self.method}: ' + ('its codes are the trained ones (the '
                'conversion is exact)' if self.method == 'qat' else
                'RepQ-ViT rounds its weights to nearest, as its public code') +
                '; leave --weight-rounding at nearest.')
        try:
            return WeightQuantConfig(bits=self.w_bits, search=self.clip_search,
                                     fold=self.fold, max_shift=self.max_shift,
                                     rounding=rounding)
        except ValueError as e:
            raise Stage2Error(f'--w-bits {self.w_bits} --fold {self.fold} '
                              f'--max-shift {self.max_shift} --weight-rounding '
                              f'{rounding}: {e}') from None


class OutputFiles:
    """What a stage-2 run created in its output directory, removed again if
    it fails.

    A failed run leaves the directory as it found it: no log, no partial
    outputs (pre-existing files are never touched), and no directory it
    created.
    """

    def __init__(self):
        self.files, self.dirs, self.loggers = [], [], []

    def add_file(self, path: str) -> str:
        if not osp.exists(path):
            self.files.append(path)
        return path

    def keep(self) -> None:
        """Success: keep everything."""
        self.files.clear()

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


def prepare_out_dir(path: str, outputs: OutputFiles) -> None:
    """Create ``path`` (recorded in ``outputs``) and check it is writable."""
    missing, parent = [], osp.abspath(path)
    while not osp.exists(parent):
        missing.append(parent)
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise Stage2Error(
            f'--out-dir {path}: {parent} exists and is not a directory; pass '
            'a directory path (it is created if missing).')
    try:
        os.makedirs(path, exist_ok=True)
        outputs.dirs.extend(reversed(missing))
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise Stage2Error(f'--out-dir {path} is not writable ({e.strerror}); '
                          'choose another directory.') from None


def state_bytes(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values()
               if torch.is_tensor(v))


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


def write_text(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same directory, then rename."""
    root, ext = osp.splitext(path)
    tmp = f'{root}.tmp{ext}'  # keep the extension: Config.dump reads it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def prepare_config(cfg, method: str, config_path: str) -> None:
    """Make ``cfg`` (in place) the stage-1 config stage 2 builds its model
    from: a plain config is wrapped with GPLQModel (``repq`` only); the
    config must import gplq_mm and must not be a W4A4 config already."""
    if cfg.model.get('type') != 'GPLQModel':
        if method not in ('repq', 'repqvit'):
            raise Stage2Error(
                f'{config_path} does not wrap its model with GPLQModel. '
                f'--method {method} needs the stage-1 config the '
                'checkpoint was trained with (see configs/gplq/); for the '
                'PTQ baseline from an FP32 checkpoint use --method repq.')
        cfg.model = dict(type='GPLQModel', model=cfg.model)
        if not imports_gplq(cfg):
            add_gplq_import(cfg)
    elif not imports_gplq(cfg):
        # stage 2 imports gplq_mm itself; the stock scripts would not
        raise Stage2Error(
            f"{config_path} uses type='GPLQModel' but its custom_imports do "
            "not import gplq_mm: add the line `custom_imports = "
            "dict(imports=['gplq_mm'], allow_failed_imports=False)` to the "
            'config. Without it the stock tools/train.py and tools/test.py '
            '(and the W4A4 config written from it) fail with "GPLQModel is '
            'not in the model registry".')
    if cfg.model.get('w4a4'):
        raise Stage2Error(f'{config_path} is already a W4A4 config; pass the '
                          'stage-1 config.')
    cfg.model.setdefault('quant', {})
    cfg.model.mimic = dict(enabled=False)  # no teacher needed in stage 2


def write_w4a4(model, out_cfg, state: dict, meta: dict, cfg_path: str,
               ckpt_path: str, check_batch, phase=None) -> None:
    """Write the W4A4 config and checkpoint, then self-check them.

    The checkpoint is byte-reproducible: no wall-clock time in it (it is in
    the JSON report), and serialised to memory so that the zip archive's
    internal name does not depend on the output file name.  Self-check: a
    model built from the written config must load the checkpoint strictly
    and compute exactly what ``model`` (the converted model) does on
    ``check_batch``; if not, both files are removed and Stage2Error raised.
    ``phase(name)``: a context timing the 'export' and 'self_check' parts.
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase('export'):
        _write_files(out_cfg, state, meta, cfg_path, ckpt_path)
    with phase('self_check'):
        _self_check(model, cfg_path, ckpt_path, check_batch)


def _write_files(out_cfg, state, meta, cfg_path, ckpt_path) -> None:
    atomic_write(cfg_path, lambda p: out_cfg.dump(p))
    buf = io.BytesIO()
    torch.save(dict(state_dict=state, meta=meta), buf)
    atomic_write(ckpt_path, lambda p: write_bytes(p, buf.getvalue()))


def _self_check(model, cfg_path: str, ckpt_path: str, check_batch) -> None:
    from mmengine.config import Config
    from mmengine.registry import MODELS
    from mmengine.runner import load_state_dict
    check = Config.fromfile(cfg_path)
    rebuilt = MODELS.build(runner_model_cfg(check))
    loaded = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    load_state_dict(rebuilt, loaded['state_dict'], strict=True)
    rebuilt.to(next(model.parameters()).device)  # --device
    rebuilt.eval()
    with torch.no_grad():
        a = model.model.extract_feat(
            model.data_preprocessor(check_batch, False)['inputs'])
        b = rebuilt.model.extract_feat(
            rebuilt.data_preprocessor(check_batch, False)['inputs'])
    a, b = (a if isinstance(a, (tuple, list)) else [a]), \
        (b if isinstance(b, (tuple, list)) else [b])
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    if diff > 1e-4:
        for p in (cfg_path, ckpt_path):
            os.remove(p)
        raise Stage2Error(
            f'self-check failed: the model rebuilt from {cfg_path} differs '
            f'from the converted model by {diff:.3g}; nothing written.')
