# Micro classifier built from the converted DINOv2 ViT-S/14 weights: its first
# 2 layers (the 384-dim, 6-head layers of arch 'dinov2-small', LayerScale on),
# 28 px input (2x2 patches + cls), linear head trained with the backbone frozen.
# Test fixture for the real-pretrained path: GPLQ_DINOV2 is the converted
# checkpoint (tools/convert_dinov2.py), GPLQ_TEST_CLS the classification set.
_base_ = '../../configs/demo/dinov2-s_fashionmnist.py'

data_root = '{{$GPLQ_TEST_CLS:data/cls/}}'
img_size = 28
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=384, num_layers=2, num_heads=6,
                  feedforward_channels=1536),
        img_size=img_size,
        frozen_stages=2))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(img_size, img_size), interpolation='bicubic'),
    dict(type='PackInputs'),
]
test_pipeline = train_pipeline
train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root,
                                                   pipeline=train_pipeline))
val_dataloader = dict(batch_size=5, dataset=dict(data_root=data_root,
                                                 pipeline=test_pipeline))
test_dataloader = val_dataloader
max_epochs = 1
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=1, max_keep_ckpts=1))
