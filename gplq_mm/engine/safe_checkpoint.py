"""Checkpoints that load with ``torch.load(weights_only=True)``.

torch >= 2.6 unpickles with ``weights_only=True`` by default.  mmengine's
CheckpointHook stores the MessageHub state (``HistoryBuffer`` objects holding
numpy arrays and bound statistics methods, pickled through
``builtins.getattr``), which that safe unpickler refuses, so the stock
``tools/test.py`` cannot read such a checkpoint.  Rather than widening torch's
allow-list for everyone, gplq_mm writes checkpoints made only of tensors and
plain Python values (:func:`to_safe`, applied by ``GPLQSafeCheckpointHook``)
and turns them back into mmengine objects on resume (:func:`from_safe`).

Checkpoints written by anything else are loaded unsafely only with an explicit
opt-in (:func:`load_checkpoint_file` with ``trust=True``, or
``tools/convert_checkpoint.py --trust``).
"""
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

HISTORY_TAG = '__mmengine_history_buffer__'
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype,
          torch.Size, torch.device)


def to_safe(obj: Any, path: str = 'checkpoint') -> Any:
    """Recursively convert ``obj`` to tensors and plain Python values.

    ``HistoryBuffer`` -> tagged dict, numpy arrays -> tensors, numpy scalars ->
    Python numbers.  Anything else that is not plain raises ``TypeError``
    naming where it is (nothing is dropped silently).
    """
    from mmengine.logging import HistoryBuffer
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {HISTORY_TAG: True, 'log': torch.from_numpy(np.array(log, dtype=np.float64)),
                'count': torch.from_numpy(np.array(count, dtype=np.float64)),
                'max_length': int(obj.max_length)}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f'{path}: numpy object array cannot be stored safely')
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, to_safe(v, f'{path}.{k}')) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_safe(v, f'{path}.{k}') for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_safe(v, f'{path}[{i}]') for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(
        f'{path}: a {type(obj).__module__}.{type(obj).__name__} cannot be '
        'loaded with torch.load(weights_only=True). Store tensors or plain '
        'Python values in checkpoints written with GPLQSafeCheckpointHook.')


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe` for the mmengine objects it encodes."""
    from mmengine.logging import HistoryBuffer
    if isinstance(obj, dict) and obj.get(HISTORY_TAG) is True:
        return HistoryBuffer(obj['log'].numpy().tolist(),
                             obj['count'].numpy().tolist(), obj['max_length'])
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, from_safe(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


class UnsafeCheckpointError(RuntimeError):
    """The file needs unsafe unpickling and the user did not opt in."""


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch >= 1.6) or a legacy file (pickled magic)."""
    import pickle
    import zipfile
    if zipfile.is_zipfile(path):
        return True
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
    with open(path, 'rb') as f:
        return f.read(len(magic)) == magic


def load_checkpoint_file(path: str, trust: bool = False) -> dict:
    """Load a checkpoint safely; unsafe unpickling only with ``trust=True``.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file holds objects beyond tensors and plain
            values (e.g. written by mmengine without GPLQSafeCheckpointHook).
        RuntimeError: the file is truncated or not a torch checkpoint.
    """
    import os
    import pickle
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist.')
    if trust:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_like_torch_file(path):  # not worth "trusting"
            raise RuntimeError(
                f'{path} is not a readable torch checkpoint (truncated or '
                'corrupted?): it is neither a zip archive (torch.save) nor a '
                'legacy torch file. Re-copy or re-create the file.') from None
        raise UnsafeCheckpointError(
            f'{path} holds Python objects that torch.load(weights_only=True) '
            'refuses (e.g. mmengine HistoryBuffer/numpy from a checkpoint not '
            'written by gplq_mm). If you trust the file, convert it once with '
            f'`python tools/convert_checkpoint.py {path} SAFE.pth --trust` '
            '(or pass --trust-checkpoint). Torch said: '
            f'{str(e).splitlines()[-1][:300]}') from None
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(
            f'{path} is not a readable torch checkpoint (truncated or '
            f'corrupted?): {e}. Re-copy or re-create the file.') from None
