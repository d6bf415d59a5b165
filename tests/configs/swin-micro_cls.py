# Micro FP32 Swin (mmpretrain SwinTransformer) on a 10-class 32 px set.
#
# Test fixture: inherits the official config and only shrinks sizes. Data: a
# folder-per-class set written by gplq_mm.demo.data.make_classification(DIR,
# ...) (Fashion-MNIST subset, or generated shapes) read by mmpretrain's stock
# CustomDataset; DIR comes from the environment variable GPLQ_TEST_CLS=DIR/.
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'

data_root = '{{$GPLQ_TEST_CLS:data/cls/}}'
num_classes = 10
img_size = 32
data_preprocessor = dict(num_classes=num_classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size)),
    dict(type='PackInputs'),
]
test_pipeline = train_pipeline
train_dataloader = dict(
    batch_size=4,
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
    batch_size=4,
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

train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = []
auto_scale_lr = dict(enable=False, base_batch_size=4)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=1, by_epoch=True))
custom_hooks = []
randomness = dict(seed=0)

model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True, embed_dims=16, depths=[2, 2], num_heads=[1, 2]),
        img_size=img_size,
        window_size=4,
        out_indices=(1, ),
        drop_path_rate=0.0),
    head=dict(num_classes=num_classes, in_channels=32),
    train_cfg=dict(_delete_=True))  # no Mixup/CutMix on a handful of images
