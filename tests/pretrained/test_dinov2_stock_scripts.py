"""The real-pretrained path through the stock scripts: a micro classifier
built from the converted DINOv2 weights (first 2 layers, LayerScale on) is
trained (head only) by mmpretrain's train.py, evaluated by its test.py, and
then quantized: GPLQ stage 1 by train.py, stage 2 by gplq_quantize.py, the
W4A4 result evaluated by the stock test.py."""
import os.path as osp

import pytest
import torch

from gplq_test_utils import (CONFIGS, REPO, build, last_metrics, load_cfg,
                             run_script, stock_script, tail)

FP32 = 'dinov2-micro_cls.py'
GPLQ = 'gplq_dinov2-micro_cls_w32a4.py'


@pytest.fixture(scope='module')
def micro(dinov2_files, cls_root, tmp_path_factory):
    ckpt = dinov2_files[0]
    work = tmp_path_factory.mktemp('dinov2_micro')
    env = {'GPLQ_DINOV2': ckpt}
    proc = run_script([stock_script('mmpretrain', 'train'),
                       osp.join(CONFIGS, FP32), '--work-dir', str(work / 'fp32')],
                      cwd=REPO, env=env)
    assert proc.returncode == 0, tail(proc)
    safe = str(work / 'fp32_safe.pth')
    proc = run_script([osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                       str(work / 'fp32' / 'epoch_1.pth'), safe, '--trust'],
                      cwd=REPO)
    assert proc.returncode == 0, tail(proc)
    return dict(pretrained=ckpt, safe=safe, work=work, env=env)


@pytest.mark.slow
def test_fp32_train_keeps_pretrained_backbone(micro):
    pre = torch.load(micro['pretrained'], weights_only=True)['state_dict']
    got = torch.load(micro['safe'], weights_only=True)['state_dict']
    # layers 0-1 of the real weights, loaded and kept frozen by the stock train
    for k in ('backbone.layers.0.attn.qkv.weight',
              'backbone.layers.1.ffn.gamma2.weight',
              'backbone.layers.1.ffn.layers.1.weight', 'backbone.cls_token'):
        torch.testing.assert_close(got[k], pre[k], rtol=0, atol=0)
    # the 37x37 position grid was resized to the micro model's 2x2
    assert got['backbone.pos_embed'].shape == (1, 5, 384)
    proc = run_script([stock_script('mmpretrain', 'test'),
                       osp.join(CONFIGS, FP32), micro['safe'], '--work-dir',
                       str(micro['work'] / 'fp32_test')], cwd=REPO,
                      env=micro['env'])
    assert proc.returncode == 0, tail(proc)
    assert 'accuracy/top1' in last_metrics(proc.stdout + proc.stderr,
                                           'accuracy')


@pytest.mark.slow
def test_injection_keeps_layerscale(micro, monkeypatch):
    """With every quantizer off, the injected model computes the FP32
    classifier exactly: the quantized attention applies gamma1 and the
    FFN keeps gamma2."""
    from gplq_mm.quant import ActQuantizer, QState
    monkeypatch.setenv('GPLQ_DINOV2', micro['pretrained'])
    cfg = load_cfg(GPLQ)
    sd = torch.load(micro['safe'], weights_only=True)['state_dict']
    fp32 = build(cfg, dict(cfg.fp32_model,
                           data_preprocessor=cfg.data_preprocessor))
    fp32.load_state_dict(sd, strict=True)
    q = build(cfg)
    q.load_state_dict(sd, strict=False)  # FP32 keys remapped under model.
    n = 0
    for m in q.modules():
        if isinstance(m, ActQuantizer):
            m.set_state(QState.OFF)
            n += 1
    assert n > 0
    fp32.eval()
    q.eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = fp32(x, mode='tensor')
        out = q(x, mode='tensor')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    attn = q.model.backbone.layers[0].attn
    assert hasattr(attn, 'q_quant') and attn.gamma1.weight.abs().mean() > 1e-3


@pytest.mark.slow
def test_gplq_stage1_stage2_stock_test(micro):
    work = micro['work']
    proc = run_script([stock_script('mmpretrain', 'train'),
                       osp.join(CONFIGS, GPLQ), '--work-dir', str(work / 's1'),
                       '--cfg-options', f'load_from={micro["safe"]}'],
                      cwd=REPO, env=micro['env'])
    assert proc.returncode == 0, tail(proc)
    assert 'GPLQ calibration done' in proc.stdout + proc.stderr
    w32a4 = str(work / 's1' / 'epoch_1.pth')
    proc = run_script([osp.join(REPO, 'tools', 'gplq_quantize.py'),
                       osp.join(CONFIGS, GPLQ), w32a4, '--out-dir',
                       str(work / 's2'), '--name', 'micro', '--calib-images',
                       '4'], cwd=REPO, env=micro['env'])
    assert proc.returncode == 0, tail(proc)
    ck = torch.load(str(work / 's2' / 'micro_w4a4.pth'), weights_only=True)
    assert any(k.endswith('weight_packed') for k in ck['state_dict'])
    proc = run_script([stock_script('mmpretrain', 'test'),
                       str(work / 's2' / 'micro_w4a4.py'),
                       str(work / 's2' / 'micro_w4a4.pth'), '--work-dir',
                       str(work / 's2_test')], cwd=REPO, env=micro['env'])
    assert proc.returncode == 0, tail(proc)
    acc = last_metrics(proc.stdout + proc.stderr, 'accuracy')
    assert 0.0 <= acc['accuracy/top1'] <= 100.0
