# Micro FP32 Mask R-CNN + mmdet Swin on the generated "shapes" COCO set
# (64 px).
#
# Test fixture: inherits the official mmdet Swin-T Mask R-CNN config and only
# shrinks sizes, so the real modules (mmdet SwinTransformer with shifted
# windows, FPN, RPNHead, StandardRoIHead with Shared2FCBBoxHead + FCNMaskHead)
# run in seconds on a CPU.  Data: gplq_mm.demo.data.make_shapes_coco(DIR, 8,
# 4, 64, seed) and the environment variable GPLQ_TEST_SHAPES=DIR/.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

data_root = '{{$GPLQ_TEST_SHAPES:data/shapes/}}'
classes = ('circle', 'square', 'triangle', 'star', 'cross', 'hexagon')
metainfo = dict(classes=classes)
img_scale = (64, 64)
embed_dims = 16
fpn_channels = 32

model = dict(
    backbone=dict(
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],  # stage 2 has a shifted-window block
        num_heads=[1, 2, 4, 8],
        window_size=4,
        drop_path_rate=0.0,
        convert_weights=False,
        init_cfg=None),
    neck=dict(
        in_channels=[embed_dims * 2**i for i in range(4)],
        out_channels=fpn_channels),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(
            in_channels=fpn_channels, fc_out_channels=64,
            num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=fpn_channels),
        mask_head=dict(
            num_convs=2, in_channels=fpn_channels,
            conv_out_channels=fpn_channels, num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    ann_file=data_root + 'annotations/instances_val.json', backend_args=None)
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=1, val_interval=1)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = []
auto_scale_lr = dict(enable=False, base_batch_size=2)
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval=1, by_epoch=True))
randomness = dict(seed=0)
