"""Generators for the demo / CI datasets.

Two datasets, both small enough to train a tiny model on two CPU cores in minutes,
both deterministic (same seed -> the same bytes on every run and machine with the
same numpy/OpenCV/Pillow/zlib):

* :func:`make_shapes_coco` - a COCO-format instance-segmentation set of textured,
  occluding shapes on cluttered backgrounds ("shapes"), read by mmdet's stock
  ``CocoDataset`` + ``LoadAnnotations(with_mask=True)`` and ``CocoMetric``.
* :func:`make_classification` - an image-classification set in the folder-per-class
  layout read by mmpretrain's stock ``CustomDataset`` (no ``ann_file``). By default
  it is a stratified subset of the real Fashion-MNIST (Debian package
  ``dataset-fashion-mnist``, files in ``/usr/share/datasets/fashion-mnist/``, MIT
  licence); without it, a generated set of 10 textured-shape classes is written.

Each output directory gets a ``manifest.json``; a second call with the same arguments
finds it and returns at once without touching the files.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import os.path as osp
import shutil
import struct
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = [
    'SHAPES_CLASSES', 'FASHION_MNIST_CLASSES', 'GENERATED_CLS_CLASSES',
    'FASHION_MNIST_DIR', 'make_shapes_coco', 'make_classification',
    'fashion_mnist_available'
]

#: Bump when the rendering changes, so stale data on disk is regenerated.
SHAPES_VERSION = 2
CLS_VERSION = 1

#: Instance classes of the shapes set (COCO category ids are 1..len).
SHAPES_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star',
                                   'cross', 'hexagon')

#: Where Debian's ``dataset-fashion-mnist`` package puts the idx files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
#: Fashion-MNIST label names, in label order 0..9.
FASHION_MNIST_CLASSES: Tuple[str, ...] = ('tshirt_top', 'trouser', 'pullover',
                                          'dress', 'coat', 'sandal', 'shirt',
                                          'sneaker', 'bag', 'ankle_boot')
#: Classes of the generated fallback classification set.
GENERATED_CLS_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle',
                                          'star', 'cross', 'hexagon', 'ring',
                                          'diamond', 'bar', 'crescent')

_MANIFEST = 'manifest.json'

#: Knobs of the shapes renderer (radius in px at 128 px, scaled with img_size).
#: Changing them changes the data: bump SHAPES_VERSION together with them.
_SHAPES_STYLE = dict(
    num_objects_p=(0.25, 0.35, 0.25, 0.15),  # P(1 object), P(2), ...
    radius=(10.0, 32.0),  # log-uniform circumradius range
    min_visible=0.65,  # every object keeps >= this fraction visible
    min_pixels=40,  # ... and at least this many pixels
    clutter=(1, 5),  # number of distractors, [lo, hi)
    texture_p=(0.7, 0.1, 0.05, 0.1, 0.05),  # solid/stripes/checker/noise/grad
    contrast=120.0,  # min L1 RGB distance to the local background (soft)
    blotches=(10.0, 35.0),  # amplitude of low-frequency background noise
    noise=(2.0, 6.0),  # sensor noise sigma range
)


# --------------------------------------------------------------------------
# manifest / output-directory handling
# --------------------------------------------------------------------------
def _read_manifest(out_dir: str) -> Optional[dict]:
    path = osp.join(out_dir, _MANIFEST)
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_manifest(out_dir: str, manifest: dict) -> None:
    path = osp.join(out_dir, _MANIFEST)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def _count_files(root: str, ext: str = '.png') -> int:
    n = 0
    for _, _, files in os.walk(root):
        n += sum(1 for f in files if f.endswith(ext))
    return n


def _prepare_out_dir(out_dir: str, kind: str, subdirs: Sequence[str],
                     force: bool) -> None:
    """Clear the sub-folders a previous (stale or interrupted) run left.

    Only folders written by these generators (recognised by a manifest of the same
    ``kind``) are removed; foreign data raises instead of being deleted.
    """
    os.makedirs(out_dir, exist_ok=True)
    old = _read_manifest(out_dir)
    present = [d for d in subdirs if osp.exists(osp.join(out_dir, d))]
    if present and not force and (old is None or old.get('kind') != kind):
        raise FileExistsError(
            f'{out_dir} already holds {present} that were not written by '
            f'gplq_mm.demo ({kind}); choose an empty directory or pass '
            'force=True (--force) to overwrite them.')
    for d in present:
        shutil.rmtree(osp.join(out_dir, d))
    if old is not None:
        os.remove(osp.join(out_dir, _MANIFEST))


def _save_png(path: str, img: np.ndarray) -> None:
    """Write an RGB (HxWx3) or gray (HxW) uint8 array as PNG, deterministically."""
    Image.fromarray(img).save(path, format='PNG', compress_level=6)


# --------------------------------------------------------------------------
# rendering helpers (shared by both generators)
# --------------------------------------------------------------------------
def _hsv_color(rng: np.random.Generator, s_range=(0.3, 1.0),
               v_range=(0.25, 1.0)) -> np.ndarray:
    h = rng.uniform(0, 180)
    s = rng.uniform(*s_range) * 255
    v = rng.uniform(*v_range) * 255
    hsv = np.array([[[h, s, v]]], dtype=np.float32)
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return rgb[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int,
                  cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (h, w)."""
    small = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int,
                blotches=(10.0, 35.0)) -> np.ndarray:
    """Gradient + low-frequency blotches; float32 HxWx3 in [0, 255]."""
    c0 = _hsv_color(rng, s_range=(0.0, 0.6), v_range=(0.2, 0.95))
    c1 = _hsv_color(rng, s_range=(0.0, 0.6), v_range=(0.2, 0.95))
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    blot = _smooth_noise(rng, h, w, int(rng.integers(3, 7)))
    img += blot[..., None] * rng.uniform(*blotches) * rng.uniform(
        0.5, 1.0, size=3).astype(np.float32)
    return img


def _texture(rng: np.random.Generator, h: int, w: int,
             avoid: Optional[np.ndarray] = None,
             kind_p: Sequence[float] = (0.6, 0.1, 0.1, 0.1, 0.1),
             contrast: float = 120.0) -> np.ndarray:
    """A random fill pattern (float32 HxWx3).

    ``avoid`` is the local background colour; the main colour is re-drawn a few
    times to keep some contrast with it (but low-contrast objects still occur).
    """
    c0 = _hsv_color(rng)
    if avoid is not None:
        for _ in range(6):
            if np.abs(c0 - avoid).sum() > contrast:
                break
            c0 = _hsv_color(rng)
    kind = rng.choice(['solid', 'stripes', 'checker', 'noise', 'gradient'],
                      p=list(kind_p))
    if kind == 'solid':
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-110, 110, size=3), 0, 255).astype(
        np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 'stripes':
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3, 9)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        m = (np.floor(u / period * 2) % 2).astype(np.float32)
    elif kind == 'checker':
        cell = int(rng.integers(2, 7))
        m = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif kind == 'noise':
        m = np.clip(0.5 + 0.5 * _smooth_noise(rng, h, w, int(
            rng.integers(8, 20))), 0, 1)
    else:  # gradient
        theta = rng.uniform(0, 2 * np.pi)
        u = np.cos(theta) * xx / w + np.sin(theta) * yy / h
        m = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    return c0[None, None] * (1 - m[..., None]) + c1[None, None] * m[..., None]


def _regular_polygon(n: int, r: float, phase: float) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _shape_outline(name: str, r: float, rng: np.random.Generator) -> List:
    """Polygon(s) of a shape centred at the origin, before rotation/aspect.

    Returns a list of ``(polygon, value)`` drawn in order (value 1 fills, 0 cuts a
    hole), so ring and crescent can be expressed too.
    """
    if name == 'circle':
        return [(_regular_polygon(48, r, 0.0), 1)]
    if name == 'square':
        return [(_regular_polygon(4, r, np.pi / 4), 1)]
    if name == 'triangle':
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(
            -0.2, 0.2, size=3)
        rr = r * rng.uniform(0.9, 1.1, size=3)
        return [(np.stack([rr * np.cos(a), rr * np.sin(a)], 1), 1)]
    if name == 'star':
        inner = r * rng.uniform(0.38, 0.52)
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rr = np.where(np.arange(10) % 2 == 0, r, inner)
        return [(np.stack([rr * np.cos(a), rr * np.sin(a)], 1), 1)]
    if name == 'cross':
        t = r * rng.uniform(0.25, 0.38)
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r),
               (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        return [(np.array(pts, dtype=np.float64), 1)]
    if name == 'hexagon':
        return [(_regular_polygon(6, r, 0.0), 1)]
    if name == 'ring':
        return [(_regular_polygon(40, r, 0.0), 1),
                (_regular_polygon(40, r * rng.uniform(0.45, 0.6), 0.0), 0)]
    if name == 'diamond':
        return [(np.array([(0, -r), (0.55 * r, 0), (0, r), (-0.55 * r, 0)],
                          dtype=np.float64), 1)]
    if name == 'bar':
        t = r * rng.uniform(0.2, 0.3)
        return [(np.array([(-r, -t), (r, -t), (r, t), (-r, t)],
                          dtype=np.float64), 1)]
    if name == 'crescent':
        off = r * rng.uniform(0.45, 0.6)
        return [(_regular_polygon(40, r, 0.0), 1),
                (_regular_polygon(40, r * 0.9, 0.0) + np.array([off, 0]), 0)]
    raise ValueError(f'unknown shape {name!r}')


def _shape_mask(name: str, h: int, w: int, cx: float, cy: float, r: float,
                angle: float, aspect: float,
                rng: np.random.Generator) -> np.ndarray:
    """Rasterise a shape to a bool (h, w) mask (sub-pixel vertex precision)."""
    ca, sa = math.cos(angle), math.sin(angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    scale = np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    canvas = np.zeros((h, w), np.uint8)
    shift = 4
    for poly, val in _shape_outline(name, r, rng):
        pts = (poly * scale) @ rot.T + np.array([cx, cy])
        pts = np.round(pts * (1 << shift)).astype(np.int32)
        cv2.fillPoly(canvas, [pts], int(val), lineType=cv2.LINE_8, shift=shift)
    return canvas.astype(bool)


def _clutter(rng: np.random.Generator, img: np.ndarray, n: int,
             scale: float) -> None:
    """Draw unannotated distractors (lines, arcs, dots, irregular blobs)."""
    h, w = img.shape[:2]
    for _ in range(n):
        color = tuple(float(c) for c in _hsv_color(rng, (0.0, 0.9), (0.1, 1.0)))
        kind = rng.choice(['line', 'arc', 'dot', 'blob'],
                          p=[0.35, 0.25, 0.15, 0.25])
        if kind == 'line':
            p0 = tuple(int(v) for v in rng.integers(0, [w, h]))
            p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
            cv2.line(img, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 'arc':
            c = tuple(int(v) for v in rng.integers(0, [w, h]))
            axes = tuple(int(v) for v in rng.integers(
                max(2, int(4 * scale)), max(3, int(30 * scale)), size=2))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), a0,
                        a0 + float(rng.uniform(40, 200)), color,
                        int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 'dot':
            c = tuple(int(v) for v in rng.integers(0, [w, h]))
            cv2.circle(img, c, int(rng.integers(1, max(2, int(4 * scale)))),
                       color, -1, cv2.LINE_AA)
        else:  # irregular blob: random star-convex polygon, no shape class
            k = int(rng.integers(8, 15))
            a = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            rr = rng.uniform(1, max(3, 9 * scale), size=k)
            c = rng.uniform(0, [w, h])
            pts = np.stack([c[0] + rr * np.cos(a), c[1] + rr * np.sin(a)], 1)
            cv2.fillPoly(img, [np.round(pts).astype(np.int32)], color,
                         cv2.LINE_AA)


def _finish(rng: np.random.Generator, img: np.ndarray, sigma_range) -> np.ndarray:
    """Sensor noise (+ sometimes a slight blur), then quantise to uint8."""
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), float(rng.uniform(0.4, 0.9)))
    img = img + rng.normal(0, rng.uniform(*sigma_range), size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# shapes (COCO instance segmentation)
# --------------------------------------------------------------------------
def _render_shapes_image(rng: np.random.Generator, size: int):
    """One image and its instances ``[(label, visible_mask)]`` (back to front)."""
    st = _SHAPES_STYLE
    img = _background(rng, size, size, st['blotches'])
    _clutter(rng, img, int(rng.integers(*st['clutter'])), size / 128)
    n_obj = 1 + int(rng.choice(len(st['num_objects_p']),
                               p=list(st['num_objects_p'])))
    lo, hi = st['radius']
    masks: List[np.ndarray] = []  # full in-image masks, back to front
    labels: List[int] = []
    for _ in range(n_obj):
        for _try in range(20):
            label = int(rng.integers(len(SHAPES_CLASSES)))
            r = float(np.exp(rng.uniform(np.log(lo), np.log(hi))) * size / 128)
            cx, cy = rng.uniform(0.3 * r, size - 0.3 * r, size=2)
            angle = float(rng.uniform(0, 2 * np.pi))
            aspect = float(np.exp(rng.uniform(-0.25, 0.25)))
            # render with a margin so the truncated fraction is known
            pad = int(math.ceil(1.5 * r)) + 2
            big = _shape_mask(SHAPES_CLASSES[label], size + 2 * pad,
                              size + 2 * pad, cx + pad, cy + pad, r, angle,
                              aspect, rng)
            m = big[pad:pad + size, pad:pad + size]
            if m.sum() < 30 or m.sum() < 0.6 * big.sum():
                continue
            # every earlier object must keep enough of itself visible
            ok = True
            cover = m.copy()
            for j in range(len(masks) - 1, -1, -1):
                vis = masks[j] & ~cover
                if vis.sum() < max(st['min_visible'] * masks[j].sum(),
                                   st['min_pixels']):
                    ok = False
                    break
                cover |= masks[j]
            if not ok:
                continue
            # paint it
            ys, xs = np.nonzero(m)
            avoid = img[int(ys.mean()), int(xs.mean())].copy()
            tex = _texture(rng, size, size, avoid=avoid,
                           kind_p=st['texture_p'], contrast=st['contrast'])
            img[m] = tex[m]
            masks.append(m)
            labels.append(label)
            break
    img = _finish(rng, img, st['noise'])
    # visible masks: subtract everything painted later
    visible = []
    cover = np.zeros((size, size), bool)
    for lab, m in zip(labels[::-1], masks[::-1]):
        visible.append((lab, m & ~cover))
        cover |= m
    return img, visible[::-1]


def _shapes_split(out_dir: str, split: str, num: int, img_size: int,
                  seed: int) -> dict:
    from pycocotools import mask as mask_utils

    split_id = {'train': 0, 'val': 1}[split]
    img_dir = osp.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    ann_id = 1
    for i in range(num):
        rng = np.random.default_rng([seed, split_id, i, 7331])
        img, instances = _render_shapes_image(rng, img_size)
        fname = f'{i:06d}.png'
        _save_png(osp.join(img_dir, fname), img)
        images.append(
            dict(id=i + 1, file_name=fname, height=img_size, width=img_size))
        for label, m in instances:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            area = int(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle['counts'] = rle['counts'].decode('ascii')
            anns.append(
                dict(id=ann_id, image_id=i + 1, category_id=label + 1,
                     segmentation=dict(size=[int(s) for s in rle['size']],
                                       counts=rle['counts']),
                     area=area, bbox=bbox, iscrowd=0))
            ann_id += 1
    coco = dict(
        info=dict(description=f'gplq_mm demo shapes ({split})',
                  version=str(SHAPES_VERSION), year=2025,
                  contributor='gplq_mm.demo.make_shapes_coco', url='',
                  date_created=''),
        licenses=[],
        images=images,
        annotations=anns,
        categories=[
            dict(id=k + 1, name=n, supercategory='shape')
            for k, n in enumerate(SHAPES_CLASSES)
        ])
    ann_path = osp.join(out_dir, 'annotations', f'instances_{split}.json')
    os.makedirs(osp.dirname(ann_path), exist_ok=True)
    with open(ann_path, 'w') as f:
        json.dump(coco, f, sort_keys=True, separators=(',', ':'))
    return dict(ann_file=ann_path, img_dir=img_dir, num_images=num,
                num_instances=len(anns))


def make_shapes_coco(out_dir: str, num_train: int = 400, num_val: int = 100,
                     img_size: int = 128, seed: int = 0,
                     force: bool = False) -> dict:
    """Write the "shapes" COCO instance-segmentation set.

    Layout::

        out_dir/manifest.json
        out_dir/train/000000.png ...        out_dir/val/000000.png ...
        out_dir/annotations/instances_train.json
        out_dir/annotations/instances_val.json

    Each image (``img_size`` square, RGB) has 1-4 objects of the 6 classes in
    :data:`SHAPES_CLASSES` (circle and hexagon are deliberately similar), with random
    size (circumradius 10-32 px at 128 px, log-uniform), rotation, aspect, colour
    and fill texture (mostly solid; stripes, checker, noise, gradient), truncation
    at the border (>= 60% inside) and mutual occlusion (each object keeps >= 65% of
    its pixels visible), over a gradient background with low-frequency blotches,
    unannotated clutter (lines, arcs, dots, irregular blobs) and sensor noise. The
    knobs are in ``_SHAPES_STYLE``. Annotations are the
    *visible* masks as compressed RLE, ``bbox`` is the tight xywh box of the visible
    mask, ``area`` its pixel count, ``iscrowd`` 0.

    Args:
        out_dir: Output directory (created).
        num_train: Number of training images.
        num_val: Number of validation images.
        img_size: Image side in pixels.
        seed: Random seed; the output is a pure function of the arguments.
        force: Regenerate even if a matching manifest exists, and overwrite
            folders that were not written by this function.

    Returns:
        dict with ``root``, ``classes``, ``metainfo`` (``dict(classes=...)``),
        ``train_ann``, ``val_ann``, ``train_img_dir``, ``val_img_dir``,
        ``num_train``, ``num_val``, ``num_train_instances``,
        ``num_val_instances``, ``manifest`` and ``generated`` (False if reused).
    """
    for name, v in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f'{name} must be a positive int, got {v!r}')
    if not isinstance(img_size, int) or img_size < 32:
        raise ValueError(f'img_size must be an int >= 32, got {img_size!r}')
    out_dir = osp.abspath(out_dir)
    params = dict(kind='shapes_coco', version=SHAPES_VERSION, seed=int(seed),
                  num_train=num_train, num_val=num_val, img_size=img_size,
                  classes=list(SHAPES_CLASSES))
    result = dict(
        root=out_dir,
        classes=SHAPES_CLASSES,
        metainfo=dict(classes=SHAPES_CLASSES),
        train_ann=osp.join(out_dir, 'annotations', 'instances_train.json'),
        val_ann=osp.join(out_dir, 'annotations', 'instances_val.json'),
        train_img_dir=osp.join(out_dir, 'train'),
        val_img_dir=osp.join(out_dir, 'val'),
        num_train=num_train,
        num_val=num_val)

    old = _read_manifest(out_dir)
    if (not force and old is not None and old.get('status') == 'complete'
            and all(old.get(k) == v for k, v in params.items())
            and osp.isfile(result['train_ann'])
            and osp.isfile(result['val_ann'])
            and _count_files(result['train_img_dir']) == num_train
            and _count_files(result['val_img_dir']) == num_val):
        result.update(num_train_instances=old['num_train_instances'],
                      num_val_instances=old['num_val_instances'],
                      manifest=old, generated=False)
        return result

    _prepare_out_dir(out_dir, 'shapes_coco', ('train', 'val', 'annotations'),
                     force)
    _write_manifest(out_dir, dict(params, status='incomplete'))
    tr = _shapes_split(out_dir, 'train', num_train, img_size, seed)
    va = _shapes_split(out_dir, 'val', num_val, img_size, seed)
    manifest = dict(params, status='complete',
                    num_train_instances=tr['num_instances'],
                    num_val_instances=va['num_instances'])
    _write_manifest(out_dir, manifest)
    result.update(num_train_instances=tr['num_instances'],
                  num_val_instances=va['num_instances'], manifest=manifest,
                  generated=True)
    return result


# --------------------------------------------------------------------------
# classification (folder per class, mmpretrain CustomDataset)
# --------------------------------------------------------------------------
def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    """Whether the four Fashion-MNIST idx files exist under ``root``."""
    return all(
        osp.isfile(osp.join(root, f)) for fs in FASHION_MNIST_FILES.values()
        for f in fs)


def _read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) idx file (MNIST format) into a uint8 array."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f'{path} is not a uint8 idx file')
    dims = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def _per_class_counts(total: int, num_classes: int) -> List[int]:
    base, rem = divmod(total, num_classes)
    return [base + (1 if k < rem else 0) for k in range(num_classes)]


def _render_cls_image(rng: np.random.Generator, label: int,
                      size: int) -> np.ndarray:
    img = _background(rng, size, size)
    _clutter(rng, img, int(rng.integers(0, 3)), size / 64)
    name = GENERATED_CLS_CLASSES[label]
    r = float(rng.uniform(0.26, 0.42) * size)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    if name == 'diamond':
        angle = float(rng.uniform(-0.3, 0.3))
    elif name in ('square', 'bar', 'cross'):
        angle = float(rng.uniform(-0.35, 0.35)) + (np.pi / 2 if
                                                   rng.random() < 0.5 else 0)
    else:
        angle = float(rng.uniform(0, 2 * np.pi))
    aspect = float(np.exp(rng.uniform(-0.15, 0.15)))
    m = _shape_mask(name, size, size, cx, cy, r, angle, aspect, rng)
    ys, xs = np.nonzero(m)
    avoid = img[int(ys.mean()), int(xs.mean())].copy() if len(ys) else None
    tex = _texture(rng, size, size, avoid=avoid)
    img[m] = tex[m]
    return _finish(rng, img, (2, 8))


def make_classification(out_dir: str, num_train: int = 6000,
                        num_val: int = 1000, seed: int = 0,
                        source: str = 'auto', img_size: int = 28,
                        fashion_mnist_dir: str = FASHION_MNIST_DIR,
                        force: bool = False,
                        holdout_after: Optional[int] = None) -> dict:
    """Write a 10-class image-classification set for mmpretrain's ``CustomDataset``.

    Layout (class index = position of the folder in sorted order, so the folders
    carry a two-digit label prefix)::

        out_dir/manifest.json
        out_dir/train/00_tshirt_top/00000.png ...
        out_dir/val/09_ankle_boot/00000.png ...

    Build the dataset with ``dict(type='CustomDataset', data_root=out_dir,
    data_prefix='train')`` (no ``ann_file``); classes come from the folder names.

    Args:
        out_dir: Output directory (created).
        num_train: Training images, split evenly over the 10 classes (stratified,
            seeded random subset of the 60k Fashion-MNIST training images).
        num_val: Validation images, likewise from the 10k Fashion-MNIST test set.
        seed: Random seed for the subset / the generated images.
        source: ``'fashion-mnist'`` (real data from ``fashion_mnist_dir``; Debian:
            ``apt-get install dataset-fashion-mnist``), ``'generated'`` (textured
            shapes, 10 classes) or ``'auto'`` (Fashion-MNIST if its files exist).
        img_size: Side of the written images. Fashion-MNIST is stored at its native
            28 px (grayscale PNG) unless another size is asked for (bicubic
            resize); generated images are RGB at this size. The configs resize in
            their pipelines, so the default 28 suits them all.
        fashion_mnist_dir: Where the Fashion-MNIST idx ``.gz`` files are.
        force: Regenerate even if a matching manifest exists.
        holdout_after: Fashion-MNIST only. ``None``: the ``val`` split comes
            from the 10k test images (the split the demo reports). An int N:
            ``val`` is a validation split carved from the 60k *training*
            images instead, disjoint from the ``train`` split of every
            :func:`make_classification` call with the same seed and
            ``num_train <= N`` (the training draws are prefixes of one seeded
            per-class permutation; the holdout takes the images after the
            first N/10 of each class).  Settings are chosen on it, never on
            the test split.

    Returns:
        dict with ``root``, ``source``, ``classes`` (names in label order),
        ``folders`` (folder names in label order), ``train_dir``, ``val_dir``,
        ``num_train``, ``num_val``, ``manifest`` and ``generated``.
    """
    if source not in ('auto', 'fashion-mnist', 'generated'):
        raise ValueError("source must be 'auto', 'fashion-mnist' or "
                         f"'generated', got {source!r}")
    if source == 'auto':
        source = ('fashion-mnist' if fashion_mnist_available(fashion_mnist_dir)
                  else 'generated')
    if source == 'fashion-mnist' and not fashion_mnist_available(
            fashion_mnist_dir):
        raise FileNotFoundError(
            f'Fashion-MNIST idx files not found in {fashion_mnist_dir}. On Debian '
            'install them with `apt-get install dataset-fashion-mnist`, pass '
            "fashion_mnist_dir=..., or use source='generated'.")
    for name, v in (('num_train', num_train), ('num_val', num_val)):
        if not isinstance(v, int) or v < 10:
            raise ValueError(f'{name} must be an int >= 10 (one image per '
                             f'class at least), got {v!r}')
    if holdout_after is not None and (
            source != 'fashion-mnist' or isinstance(holdout_after, bool)
            or not isinstance(holdout_after, int)
            or holdout_after < num_train):
        raise ValueError(
            'holdout_after carves a validation split out of the Fashion-MNIST '
            'training images: it needs source="fashion-mnist" and an int >= '
            f'num_train ({num_train}), got {holdout_after!r} with source '
            f'{source!r}.')
    classes = (FASHION_MNIST_CLASSES
               if source == 'fashion-mnist' else GENERATED_CLS_CLASSES)
    folders = tuple(f'{k:02d}_{n}' for k, n in enumerate(classes))
    out_dir = osp.abspath(out_dir)
    params = dict(kind='classification', version=CLS_VERSION, seed=int(seed),
                  source=source, num_train=num_train, num_val=num_val,
                  img_size=img_size, classes=list(classes))
    # always part of the settings (a manifest without it reads as None), so a
    # carved validation split is never reused as the test split or back
    params['holdout_after'] = holdout_after
    result = dict(root=out_dir, source=source, classes=classes,
                  folders=folders, train_dir=osp.join(out_dir, 'train'),
                  val_dir=osp.join(out_dir, 'val'), num_train=num_train,
                  num_val=num_val)

    old = _read_manifest(out_dir)
    if (not force and old is not None and old.get('status') == 'complete'
            and all(old.get(k) == v for k, v in params.items())
            and _count_files(result['train_dir']) == num_train
            and _count_files(result['val_dir']) == num_val):
        result.update(manifest=old, generated=False)
        return result

    _prepare_out_dir(out_dir, 'classification', ('train', 'val'), force)
    _write_manifest(out_dir, dict(params, status='incomplete'))
    for split_id, (split, total) in enumerate(
        (('train', num_train), ('val', num_val))):
        counts = _per_class_counts(total, len(classes))
        for f in folders:
            os.makedirs(osp.join(out_dir, split, f), exist_ok=True)
        if source == 'fashion-mnist':
            carve = split == 'val' and holdout_after is not None
            src_split, src_id = ('train', 0) if carve else (split, split_id)
            skip = (_per_class_counts(holdout_after, len(classes))
                    if carve else [0] * len(classes))
            img_f, lab_f = FASHION_MNIST_FILES[src_split]
            images = _read_idx(osp.join(fashion_mnist_dir, img_f))
            labels = _read_idx(osp.join(fashion_mnist_dir, lab_f))
            rng = np.random.default_rng([seed, src_id, 4242])
            for k, n in enumerate(counts):
                idx = np.flatnonzero(labels == k)
                if skip[k] + n > len(idx):
                    raise ValueError(
                        f'asked for {n} {split} images of class {k} after '
                        f'{skip[k]}, Fashion-MNIST has {len(idx)}')
                perm = rng.permutation(idx)
                pick = np.sort(perm[skip[k]:skip[k] + n])
                for j, src in enumerate(pick):
                    im = images[src]
                    if img_size != im.shape[0]:
                        im = np.asarray(
                            Image.fromarray(im).resize(
                                (img_size, img_size), Image.BICUBIC))
                    _save_png(osp.join(out_dir, split, folders[k],
                                       f'{j:05d}.png'), im)
        else:
            for k, n in enumerate(counts):
                for j in range(n):
                    rng = np.random.default_rng([seed, split_id, k, j, 99])
                    im = _render_cls_image(rng, k, img_size)
                    _save_png(osp.join(out_dir, split, folders[k],
                                       f'{j:05d}.png'), im)
    manifest = dict(params, status='complete')
    _write_manifest(out_dir, manifest)
    result.update(manifest=manifest, generated=True)
    return result
