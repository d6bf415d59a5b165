# Tiny FP32 Swin (mmpretrain SwinTransformer) on a Fashion-MNIST subset.
#
# It inherits the real mmpretrain Swin-T config and only shrinks sizes, so the same
# SwinTransformer (W-MSA / SW-MSA blocks with relative position bias, PatchMerging),
# GlobalAveragePooling + LinearClsHead and the stock tools/train.py / tools/test.py
# run as for ImageNet. Nothing is downloaded.
#
# Sizes: 28 px images resized to 64, patch 4 -> 16x16 tokens, window 4, four stages
# of depth 2 (16, 8, 4, 2 tokens per side; Swin-T: 56, 28, 14, 7 with window 7).
# Stages 0-1 have several windows, so a W-MSA and a shifted SW-MSA block each (with
# the attention mask), stage 2 is exactly one window (shift disabled, as in Swin-T's
# last stage) and stage 3 is smaller than a window, so pad_small_map=True pads it to
# 4x4 (mmpretrain asserts otherwise). Window 7 at 56 px was measured ~1.5x slower per
# step (the 2x2 last stage padded to 7x7 dominates) for the same accuracy.
#
# Data: python tools/make_demo_data.py --what cls   (-> data/demo/cls/;
#   real Fashion-MNIST from Debian's `dataset-fashion-mnist` package when installed,
#   else a generated 10-class set of the same layout)
# Train: python <site-packages>/mmpretrain/.mim/tools/train.py \
#            configs/demo/swin-tiny_fashionmnist.py --work-dir work_dirs/swin_fm
#
# Pointing it at another data directory DIR (with train/<class>/ and val/<class>/):
#   * simplest: the environment variable GPLQ_DEMO_CLS=DIR/ (trailing slash),
#     substituted by mmengine when the config is parsed;
#   * or --cfg-options (`data_root=DIR/` alone changes only the top-level variable,
#     NOT the dataset paths already derived from it):
#       --cfg-options train_dataloader.dataset.data_root=DIR/
#         val_dataloader.dataset.data_root=DIR/ test_dataloader.dataset.data_root=DIR/
# Fast CI variant: a few images per class (tools/make_demo_data.py --what cls
#   --out DIR --cls-train 40 --cls-val 20) and
#   --cfg-options train_cfg.max_epochs=1 train_cfg.val_interval=1
# CPU: run with OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=passive) on small machines;
#   OpenMP spin-waiting made torch about 10x slower on the 2-core machines here.
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'

data_root = '{{$GPLQ_DEMO_CLS:data/demo/cls/}}'
num_classes = 10
img_size = 64
embed_dims = 32
batch_size = 64

data_preprocessor = dict(
    num_classes=num_classes,
    # Fashion-MNIST statistics (gray images are loaded as 3 equal channels)
    mean=[72.94, 72.94, 72.94],
    std=[90.02, 90.02, 90.02],
    to_rgb=True)

model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True,
            embed_dims=embed_dims,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 4, 8]),
        img_size=img_size,
        patch_size=4,
        window_size=4,
        pad_small_map=True,
        drop_path_rate=0.0),
    head=dict(
        num_classes=num_classes,
        in_channels=embed_dims * 8,
        loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)),
    # no Mixup / CutMix for a short run on tiny images
    train_cfg=dict(_delete_=True))

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
    batch_size=batch_size,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=100,
    num_workers=1,
    persistent_workers=True,
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

# schedule: a few epochs from scratch, AdamW, short warm-up, cosine decay
max_epochs = 4
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-5,
        by_epoch=True,
        begin=0,
        end=max_epochs,
        convert_to_iter_based=True)
]
# lr 1e-3 is for 64 images per step (1 process x batch 64)
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True))
custom_hooks = []
randomness = dict(seed=0)
load_from = None
