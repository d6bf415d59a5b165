# Tiny FP32 DeiT (mmpretrain VisionTransformer) on Fashion-MNIST (28 px, 10 classes).
#
# Inherits the official DeiT-T config and only shrinks sizes (embed 96, 4 layers,
# patch 4 -> 49 tokens + cls), so the same VisionTransformer / MultiheadAttention /
# VisionTransformerClsHead code runs as for ImageNet. Data: a folder-per-class set
# from gplq_mm.demo.data.make_classification (real Fashion-MNIST from Debian's
# dataset-fashion-mnist package, or a generated fallback), read by the stock
# CustomDataset. Point it elsewhere with the environment variable GPLQ_DEMO_CLS=DIR/.
#
#   python <mmpretrain>/tools/train.py configs/demo/deit-tiny_fashionmnist.py
_base_ = 'mmpretrain::deit/deit-tiny_4xb256_in1k.py'

data_root = '{{$GPLQ_DEMO_CLS:data/demo/cls/}}'
num_classes = 10
img_size = 28
embed_dims = 96
data_preprocessor = dict(num_classes=num_classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=100,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

max_epochs = 6
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5,
         by_epoch=True, begin=1, end=max_epochs),
]
auto_scale_lr = dict(enable=False, base_batch_size=64)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_epochs, by_epoch=True, max_keep_ckpts=1))
custom_hooks = []
randomness = dict(seed=0)

model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True, embed_dims=embed_dims, num_layers=4, num_heads=3,
            feedforward_channels=4 * embed_dims),
        img_size=img_size,
        patch_size=4,
        drop_path_rate=0.0),
    head=dict(num_classes=num_classes, in_channels=embed_dims),
    train_cfg=dict(_delete_=True))  # no Mixup/CutMix at this scale
