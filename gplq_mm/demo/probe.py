"""Generalization check (the paper's Table 1 protocol): frozen features, linear probe.

For a classifier config + checkpoint (FP32, W32A4 or W4A4 alike), the backbone
features (``extract_feat``: the cls token for ViTs) of downstream sets that
stage 1 never sees are extracted through the config's own test pipeline, and
a multinomial logistic regression is fitted on the train split and scored on
the test split.  Its regularisation C is chosen on a validation split carved
from the downstream train split, never on the test split.

Downstream sets (:func:`make_downstream`), both folder-per-class like the
demo's classification data:

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images shipped in
  the package), upscaled to 28 px;
* ``shapes``: the project's generated textured-shape classes
  (:func:`gplq_mm.demo.data.make_classification` with ``source='generated'``).
"""
import copy
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

DOWNSTREAM = ('digits', 'shapes')
C_GRID = (0.01, 0.1, 1.0, 10.0)


def make_downstream(root: str, num_train: int = 500, num_test: int = 300,
                    seed: int = 0) -> Dict[str, str]:
    """Write the downstream sets under ``root`` (cached by manifest);
    returns ``{name: set root}`` with ``train/`` and ``val/`` (test) splits."""
    # fit_probe picks C on a stratified 20% of the train split: it needs at
    # least one image of each of the 10 classes there
    if num_train < 50:
        raise ValueError(f'num_train={num_train}: the probe chooses its C on '
                         '20% of the downstream train split, one image per '
                         'class at least; use 50 or more training images.')
    if num_test < 10:
        raise ValueError(f'num_test={num_test}: use at least 10 test images '
                         '(one per class).')
    from gplq_mm.demo.data import make_classification
    out = {}
    d = osp.join(root, 'digits')
    _make_digits(d, num_train, num_test, seed)
    out['digits'] = d
    s = osp.join(root, 'shapes')
    make_classification(s, num_train, num_test, seed=seed, source='generated')
    out['shapes'] = s
    return out


def _make_digits(out_dir: str, num_train: int, num_test: int,
                 seed: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits
    params = dict(kind='digits', num_train=num_train, num_test=num_test,
                  seed=seed, size=28)
    from gplq_mm.demo.data import (_per_class_counts, _prepare_out_dir,
                                   _read_manifest, _write_manifest)
    if _read_manifest(out_dir) == params:
        return
    # a set of other sizes written here before: its files must go (file names
    # index the whole split, so they would stay behind, in other classes'
    # folders); foreign folders raise instead of being deleted
    _prepare_out_dir(out_dir, 'digits', ('train', 'val'), force=False)
    digits = load_digits()
    rng = np.random.default_rng([seed, 17])
    picks = {'train': [], 'val': []}  # stratified: equal images per class
    for k, (n_tr, n_te) in enumerate(zip(_per_class_counts(num_train, 10),
                                         _per_class_counts(num_test, 10))):
        idx = rng.permutation(np.flatnonzero(digits.target == k))
        if n_tr + n_te > len(idx):
            raise ValueError(f'digits has {len(idx)} images of class {k}; '
                             f'asked for {n_tr} + {n_te}')
        picks['train'] += [(k, i) for i in idx[:n_tr]]
        picks['val'] += [(k, i) for i in idx[n_tr:n_tr + n_te]]
    for split, items in picks.items():
        for k in range(10):
            os.makedirs(osp.join(out_dir, split, f'{k:02d}_digit{k}'),
                        exist_ok=True)
        for j, (k, i) in enumerate(items):
            im = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(im).resize((28, 28), Image.BICUBIC).save(
                osp.join(out_dir, split, f'{k:02d}_digit{k}', f'{j:05d}.png'))
    _write_manifest(out_dir, params)  # last: an interrupted run is redone


def build_model(config: str, checkpoint: str):
    """The model of ``config`` with ``checkpoint`` loaded strictly, as the
    stock test script builds it (the config's ``data_preprocessor`` merged
    in, ``custom_imports`` imported)."""
    from mmengine.runner import load_checkpoint

    from gplq_mm.engine.build import build_from_config
    cfg, model = build_from_config(config, default_scope='mmpretrain')
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                    logger='silent')
    model.eval()
    return cfg, model


def extract(cfg, model, data_root: str, split: str,
            batch_size: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """Backbone features and labels of ``data_root/split`` through the
    config's test pipeline."""
    from mmengine.runner import Runner
    dl_cfg = copy.deepcopy(cfg.test_dataloader)
    dl_cfg.batch_size = batch_size
    dl_cfg.dataset.data_root = data_root
    dl_cfg.dataset.data_prefix = split
    dl_cfg.dataset.pop('ann_file', None)
    loader = Runner.build_dataloader(dl_cfg)
    inner = getattr(model, 'model', model)  # GPLQModel wraps the classifier
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            data = model.data_preprocessor(batch, False)
            f = inner.extract_feat(data['inputs'])
            f = f[-1] if isinstance(f, (tuple, list)) else f
            feats.append(f.flatten(1).float().cpu().numpy())
            labels += [int(s.gt_label) for s in data['data_samples']]
    return np.concatenate(feats), np.asarray(labels)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray, seed: int = 0) -> dict:
    """Standardised features, logistic regression; C chosen on 20% of the
    train split, then refitted on all of it.  Returns accuracies in %."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    xa, xv, ya, yv = train_test_split(x_train, y_train, test_size=0.2,
                                      random_state=seed, stratify=y_train)

    def fit(x, y, c):
        sc = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=2000).fit(sc.transform(x), y)
        return lambda z: clf.predict(sc.transform(z))

    val = {c: float((fit(xa, ya, c)(xv) == yv).mean()) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (val[c], -c))
    acc = float((fit(x_train, y_train, best)(x_test) == y_test).mean())
    return dict(top1=100 * acc, C=best, val_top1=100 * val[best])


def probe(config: str, checkpoint: str, sets: Dict[str, str],
          log=print) -> dict:
    """``{set: {top1, C, val_top1}, 'average': mean top1}`` for one model."""
    cfg, model = build_model(config, checkpoint)
    res = {}
    for name, root in sets.items():
        xtr, ytr = extract(cfg, model, root, 'train')
        xte, yte = extract(cfg, model, root, 'val')
        res[name] = fit_probe(xtr, ytr, xte, yte)
        log(f'{name}: linear probe top-1 {res[name]["top1"]:.2f} '
            f'(C={res[name]["C"]}, {len(ytr)} train / {len(yte)} test)')
    res['average'] = float(np.mean([res[n]['top1'] for n in sets]))
    return res
