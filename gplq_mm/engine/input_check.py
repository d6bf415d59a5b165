"""Finite-input checks for calibration batches (stage 1 and stage 2).

Called only while calibrating (never in a training step): one
``torch.isfinite`` over the preprocessed batch, so a NaN/inf image is named
by its file instead of surfacing later as a NaN scale or NaN QwT sums.
"""
from typing import List, Optional, Sequence

import torch

from gplq_mm.quant import NonFiniteError


class NonFiniteInputError(NonFiniteError):
    """A calibration batch holds NaN or inf values."""


def image_names(data_samples: Optional[Sequence], idx: Sequence[int]
                ) -> List[str]:
    """``img_path`` of the given batch entries (or their position)."""
    names = []
    for i in idx:
        ds = data_samples[i] if data_samples is not None and \
            i < len(data_samples) else None
        meta = getattr(ds, 'metainfo', None) or {}
        names.append(str(meta.get('img_path') or f'image {i} of the batch'))
    return names


def batch_image_names(data: dict) -> List[str]:
    inputs = data.get('inputs')
    n = len(inputs) if inputs is not None else 0
    return image_names(data.get('data_samples'), range(n))


def check_finite_inputs(data: dict, where: str) -> None:
    """Raise :class:`NonFiniteInputError` naming the images with NaN/inf.

    Args:
        data: The output of the model's ``data_preprocessor`` (``inputs``: a
            batch tensor or a list of image tensors; ``data_samples``).
        where: Prefix of the message, e.g. ``'GPLQ calibration, batch 3'``.
    """
    inputs = data['inputs']
    if torch.is_tensor(inputs):
        if bool(torch.isfinite(inputs).all()):
            return
        bad = (~torch.isfinite(inputs.reshape(len(inputs), -1))).any(1)
        idx = bad.nonzero().flatten().tolist()
    else:
        idx = [i for i, x in enumerate(inputs)
               if torch.is_tensor(x) and not bool(torch.isfinite(x).all())]
        if not idx:
            return
    names = image_names(data.get('data_samples'), idx)
    raise NonFiniteInputError(
        f'{where}: the preprocessed input of {len(idx)} image(s) contains '
        f'NaN or inf: {", ".join(names)}. Calibration needs finite inputs: '
        'check these files and the data pipeline (float images with NaN, a '
        'transform dividing by zero) and data_preprocessor mean/std (std '
        'must be > 0); remove or fix the images and run again.')
