"""Checkpoint-key policy of GPLQ models, in one place.

* :data:`QUANT_KEY` tells quantizer state (activation/weight scales,
  ``initialized`` flags) from model weights;
* :func:`remap_plain_keys` lets a checkpoint of the plain model (keys without
  ``model.``) load into ``GPLQModel``;
* :func:`check_loaded_keys` decides which missing/unexpected keys are an
  error (GPLQModel raises ``CheckpointMismatchError`` with its message) and
  which are an FP32 start.

``GPLQModel`` registers them as its load hooks; the stage-1 hooks and
``gplq_quantize.py`` ask :func:`has_quant_state` about a checkpoint.
"""
import re
from typing import Dict, Iterable, List, Optional

import torch
from mmengine.logging import print_log

# Keys of quantizer state: missing ones mean "not calibrated / not loaded".
QUANT_KEY = re.compile(r'(^|\.)(act|q|k|v|attn|weight)_quant\.')


def has_quant_state(keys: Iterable[str]) -> bool:
    """Whether a state dict (its keys) holds any quantizer state."""
    return any(QUANT_KEY.search(k) for k in keys)


def _preview(keys: List[str], n: int = 8) -> str:
    more = f' ... (+{len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def remap_plain_keys(state_dict: Dict, prefix: str) -> bool:
    """Move the keys of a plain-model checkpoint under ``prefix + 'model.'``
    (in place); returns whether the checkpoint holds quantizer state."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    inner = prefix + 'model.'
    if keys and not any(k.startswith(inner) for k in keys):
        for k in keys:
            state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
    return has_quant_state(keys)


def shape_mismatches(state_dict: Dict, own: Dict) -> List[str]:
    """``'key (ckpt shape) vs model (shape)'`` for every key whose shapes
    differ (torch only logs these as messages, which mmengine's
    ``strict=False`` loading merely prints)."""
    return [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state_dict.items()
            if k in own and torch.is_tensor(v) and v.shape != own[k].shape]


def check_loaded_keys(incompatible, ckpt_has_quant: bool,
                      shape_mismatch: List[str]) -> Optional[str]:
    """The error message for keys that do not fit (``None`` if they fit);
    accepts (and drops from ``incompatible``) the missing quantizer keys of
    a checkpoint without any quantizer state (FP32 start)."""
    missing = [k for k in incompatible.missing_keys
               if not k.endswith('num_batches_tracked')]
    unexpected = list(incompatible.unexpected_keys)
    q_missing = [k for k in missing if QUANT_KEY.search(k)]
    w_missing = [k for k in missing if not QUANT_KEY.search(k)]
    problems = []
    if shape_mismatch:
        problems.append('shape mismatch (checkpoint vs model): '
                        f'{_preview(shape_mismatch)}')
    if w_missing:
        problems.append(f'missing model keys: {_preview(w_missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {_preview(unexpected)}')
    if q_missing and ckpt_has_quant:
        problems.append('the checkpoint has quantizer state but not for: '
                        f'{_preview(q_missing)}')
    if problems:
        hint = ('A W4A4 checkpoint needs the *_w4a4.py config written '
                'next to it by tools/gplq_quantize.py; a W32A4 '
                'checkpoint needs the stage-1 config it was trained with; '
                'an FP32 checkpoint must be of the same architecture.')
        if any('weight_packed' in k for k in unexpected + missing):
            hint = ('Integer (W4A4) and float (W32A4/FP32) checkpoints '
                    'differ: ' + hint)
        return ('Checkpoint does not match the GPLQ model built from the '
                'config: ' + '; '.join(problems) + '. ' + hint +
                ' (set model.strict_load=False only if you have checked '
                'these keys yourself).')
    if q_missing:
        # FP32 checkpoint (stage-1 start): scales come from calibration.
        print_log(
            f'GPLQ: loaded a checkpoint without quantizer state; '
            f'{len(q_missing)} quantizer entries keep their defaults '
            'until GPLQCalibrationHook calibrates them in before_train. '
            'Evaluating this model without calibration is an error.',
            logger='current')
        # handled here: keep mmengine from listing every scale as missing
        for k in q_missing:
            incompatible.missing_keys.remove(k)
    return None
