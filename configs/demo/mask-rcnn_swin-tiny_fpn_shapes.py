# Tiny FP32 Mask R-CNN + Swin on the generated "shapes" COCO set (128 px, 6 classes).
#
# It inherits the real mmdet Swin-T Mask R-CNN config and only shrinks sizes, so the
# same modules (mmdet SwinTransformer / FPN / RPNHead / StandardRoIHead with
# Shared2FCBBoxHead + FCNMaskHead) and the same stock tools/train.py and
# tools/test.py run as for the COCO model. Nothing is downloaded (init_cfg=None).
#
# Data: python tools/make_demo_data.py --what shapes      (-> data/demo/shapes/)
# Train: python <site-packages>/mmdet/.mim/tools/train.py \
#            configs/demo/mask-rcnn_swin-tiny_fpn_shapes.py --work-dir work_dirs/shapes
# Test:  python <site-packages>/mmdet/.mim/tools/test.py \
#            configs/demo/mask-rcnn_swin-tiny_fpn_shapes.py work_dirs/shapes/epoch_10.pth
#
# Pointing it at another data directory DIR (with train/, val/, annotations/):
#   * simplest: the environment variable GPLQ_DEMO_SHAPES=DIR/ (trailing slash),
#     substituted by mmengine when the config is parsed, so every path below follows;
#   * or --cfg-options (note: `data_root=DIR/` alone changes only the top-level
#     variable, NOT the dataset/evaluator paths already derived from it):
#       --cfg-options train_dataloader.dataset.data_root=DIR/
#         val_dataloader.dataset.data_root=DIR/ test_dataloader.dataset.data_root=DIR/
#         val_evaluator.ann_file=DIR/annotations/instances_val.json
#         test_evaluator.ann_file=DIR/annotations/instances_val.json
# Fast CI variant: generate a few images (tools/make_demo_data.py --what shapes
#   --out DIR --shapes-train 16 --shapes-val 8), point GPLQ_DEMO_SHAPES at it and add
#   --cfg-options train_cfg.max_epochs=1 train_cfg.val_interval=1
#   (CocoMetric evaluates on every image of the val json, so shrink the val set by
#   generating a smaller one, not with dataset `indices`).
# CPU: run with OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=passive) on small machines;
#   OpenMP spin-waiting made torch about 10x slower on the 2-core machines here.
# Measured here (2 cores, shared, OMP_NUM_THREADS=1): 10 epochs x 50 steps at
#   0.45-0.8 s/step, box AP 0.181 / mask AP 0.203 on the 100 val images. Learning
#   is limited by the from-scratch RoI classifier, not by the data: easier data and
#   other LRs/optimizers gave about the same AP at the same step count.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

data_root = '{{$GPLQ_DEMO_SHAPES:data/demo/shapes/}}'
classes = ('circle', 'square', 'triangle', 'star', 'cross', 'hexagon')
num_classes = len(classes)
metainfo = dict(classes=classes)
img_scale = (128, 128)
batch_size = 8

embed_dims = 32
fpn_channels = 64

model = dict(
    backbone=dict(
        embed_dims=embed_dims,
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        drop_path_rate=0.0,  # short from-scratch schedule: no stochastic depth
        convert_weights=False,
        pretrained=None,
        init_cfg=None),
    neck=dict(
        in_channels=[embed_dims, embed_dims * 2, embed_dims * 4, embed_dims * 8],
        out_channels=fpn_channels),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        # 128 px images: anchors 16..256 px instead of COCO's 32..512
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(
            in_channels=fpn_channels,
            fc_out_channels=256,
            num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=fpn_channels),
        mask_head=dict(
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            num_classes=num_classes)),
    # at most a handful of objects per 128 px image: far fewer proposals and
    # sampled RoIs than COCO's 2000 / 512 (RoIAlign and NMS dominate on CPU)
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=150),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=150)))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
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
    batch_size=batch_size,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=0),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=batch_size,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric=['bbox', 'segm'],
    format_only=False,
    backend_args=None)
test_evaluator = val_evaluator

# schedule: a few epochs from scratch, AdamW with a short warm-up and cosine decay
max_epochs = 10
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(
        type='CosineAnnealingLR',
        eta_min_ratio=0.05,
        by_epoch=True,
        begin=0,
        end=max_epochs,
        convert_to_iter_based=True)
]
optim_wrapper = dict(
    optimizer=dict(lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
# lr 2e-3 is for 8 images per step (1 process x batch 8)
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
log_processor = dict(window_size=10)
load_from = None
