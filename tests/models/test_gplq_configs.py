"""The stage-1 configs in configs/gplq/ for the real COCO / ImageNet models.

Each must parse with mmengine (resolving its official ``mmdet::`` /
``mmpretrain::`` base), carry the paper's stage-1 recipe, and build its model
through ``GPLQModel`` (random weights: the checkpoints are not available
offline) with an optimizer that treats the quantizer scales as asked.
"""
import gc
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, DefaultScope

from gplq_mm.models import GPLQModel
from gplq_mm.quant import ActQuantizer
from gplq_test_utils import REPO, build

CFG_DIR = osp.join(REPO, 'configs', 'gplq')
DET = [
    'gplq_mask-rcnn_swin-t-p4-w7_fpn_1x_coco_w32a4.py',
    'gplq_mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco_w32a4.py',
    'gplq_mask-rcnn_swin-s-p4-w7_fpn_ms-crop-3x_coco_w32a4.py',
]
CLS = [f'gplq_swin-{a}_in1k_w32a4.py'
       for a in ('tiny', 'small', 'base', 'large')] + \
      [f'gplq_deit-{a}_in1k_w32a4.py' for a in ('tiny', 'small', 'base')] + \
      [f'gplq_deit-{a}-distilled_in1k_w32a4.py' for a in ('small', 'base')]
# feature dims (mimic) and the backbone depth of each classifier
CLS_DIMS = {'swin-tiny': 768, 'swin-small': 768, 'swin-base': 1024,
            'swin-large': 1536, 'deit-tiny': 192, 'deit-small': 384,
            'deit-base': 768}


def test_every_config_is_covered():
    assert sorted(osp.basename(p) for p in glob.glob(
        osp.join(CFG_DIR, '*.py'))) == sorted(DET + CLS)


def _check_recipe(cfg: Config, det: bool) -> None:
    assert cfg.custom_imports == dict(imports=['gplq_mm'],
                                      allow_failed_imports=False)
    assert cfg.model.type == 'GPLQModel'
    assert cfg.model.quant.scope == 'whole'
    assert cfg.model.model.type == ('MaskRCNN' if det else 'ImageClassifier')
    if det:
        assert cfg.model.model.backbone.init_cfg is None
        assert cfg.model.mimic.enabled is False
    else:
        assert cfg.model.mimic == dict(enabled=True, var_ratio=0.6,
                                       multiple=32, weight=1.0)
    # one epoch, constant LR 5e-6, AdamW
    assert cfg.train_cfg == dict(type='EpochBasedTrainLoop', max_epochs=1,
                                 val_interval=1)
    assert cfg.param_scheduler == []
    ow = cfg.optim_wrapper
    # plain FP32 OptimWrapper (also for the AMP-based Swin-S config)
    assert ow.get('type', 'OptimWrapper') == 'OptimWrapper'
    assert ow.optimizer.type == 'AdamW' and ow.optimizer.lr == 5e-6
    assert ow.optimizer.weight_decay == 0.05  # the base's
    assert ow.paramwise_cfg.custom_keys['_quant.scale'] == dict(
        decay_mult=0.0)
    if det:  # the base's own no-decay keys survive the merge
        for k in ('absolute_pos_embed', 'relative_position_bias_table',
                  'norm'):
            assert k in ow.paramwise_cfg.custom_keys
    else:
        assert ow.paramwise_cfg.norm_decay_mult == 0.0
    # batch 1/GPU on COCO, 16/GPU on ImageNet; 8 GPUs; LR not auto-scaled
    assert cfg.train_dataloader.batch_size == (1 if det else 16)
    assert cfg.auto_scale_lr == dict(enable=False,
                                     base_batch_size=8 if det else 128)
    assert [h.type for h in cfg.custom_hooks] == [
        'GPLQCalibrationHook', 'GPLQSafeCheckpointHook']  # no EMAHook
    ck = cfg.default_hooks.checkpoint
    assert ck.type == 'CheckpointHook' and ck.interval == 1 and ck.by_epoch
    prefix = ('https://download.openmmlab.com/mmdetection/v2.0/swin/' if det
              else 'https://download.openmmlab.com/mmclassification/v0/')
    assert cfg.load_from.startswith(prefix) and cfg.load_from.endswith('.pth')


@pytest.mark.parametrize('name', DET + CLS)
def test_config_parses_and_builds(name):
    det = name in DET
    cfg = Config.fromfile(osp.join(CFG_DIR, name))
    _check_recipe(cfg, det)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        hooks = [HOOKS.build(h) for h in cfg.custom_hooks]
    assert [type(h).__name__ for h in hooks] == [
        'GPLQCalibrationHook', 'GPLQSafeCheckpointHook']

    model = build(cfg)
    assert isinstance(model, GPLQModel)
    # stage 1 runs without stochastic depth (the bases train with 0.1-0.5;
    # docs/ablation.md §7): no DropPath left that drops anything
    drops = [n for n, m in model.named_modules()
             if type(m).__name__ == 'DropPath']
    assert drops and all(model.get_submodule(n).drop_prob == 0.0
                         for n in drops), name
    kinds = {r.kind for r in model.report.records}
    assert kinds == {'Linear', 'Conv2d', 'attention'}
    # the top-level data_preprocessor (mmpretrain) reaches the inner model
    dp = model.data_preprocessor
    assert dp is model.model.data_preprocessor
    assert torch.allclose(dp.mean.flatten(),
                          torch.tensor([123.675, 116.28, 103.53]))
    if not det:
        arch = name[len('gplq_'):].split('_')[0].replace('-distilled', '')
        head_in = model.model.head.layers.head.in_features \
            if hasattr(model.model.head, 'layers') else \
            model.model.head.fc.in_features
        assert head_in == CLS_DIMS[arch]

    # the optimizer the Runner would build: scales without weight decay,
    # other weights with the base's decay, non-learnable scales left out
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        ow = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = {id(p): g for g in ow.optimizer.param_groups for p in g['params']}
    quants = [q for q in model.modules() if isinstance(q, ActQuantizer)]
    for q in quants:
        if q.scale.requires_grad:
            assert groups[id(q.scale)]['weight_decay'] == 0.0, q.name
            assert groups[id(q.scale)]['lr'] == 5e-6
        else:
            assert id(q.scale) not in groups
    qkv = next(m for n, m in model.named_modules() if n.endswith('attn.qkv')
               or n.endswith('w_msa.qkv'))
    assert groups[id(qkv.weight)]['weight_decay'] == 0.05
    del model, ow, groups
    gc.collect()
