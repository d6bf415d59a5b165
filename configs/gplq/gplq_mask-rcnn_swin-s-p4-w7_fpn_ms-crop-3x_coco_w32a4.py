# GPLQ stage 1 (Act-QAT, W32A4) of Mask R-CNN Swin-S 3x (multi-scale + crop
# training) on COCO.
#
# FP32 (mmdet model zoo): box AP 48.2, mask AP 43.2; paper, GPLQ W32A4: 45.7 /
# 42.1. Activations are fake-quantized to 4 bit with LSQ-learned scales;
# weights stay FP32 and trainable. The checkpoint this run writes (epoch_1.pth)
# is the W32A4 model, the input of stage 2 (weight PTQ + QwT).
#
#   bash <site-packages>/mmdet/.mim/tools/dist_train.sh \
#     configs/gplq/gplq_mask-rcnn_swin-s-p4-w7_fpn_ms-crop-3x_coco_w32a4.py 8
#   python <site-packages>/mmdet/.mim/tools/test.py \
#     configs/gplq/gplq_mask-rcnn_swin-s-p4-w7_fpn_ms-crop-3x_coco_w32a4.py \
#     work_dirs/gplq_mask-rcnn_swin-s-p4-w7_fpn_ms-crop-3x_coco_w32a4/epoch_1.pth
_base_ = [
    'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py',
    './_base_/gplq_stage1.py'  # the shared stage-1 recipe
]
custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

# Wrap the official detector (the SoftTeacher pattern). scope='whole' quantizes
# backbone, FPN, RPN and RoI heads (the RepQ-ViT detection protocol the paper
# compares against): Linear/Conv inputs A4 per channel, the patch embedding
# input A8, q/k/v A4 per token, post-softmax A4 log-sqrt2.
fp32_model = _base_.model
fp32_model.backbone.drop_path_rate = _base_.gplq_drop_path_rate  # stage1.py
fp32_model.backbone.init_cfg = None  # weights come from load_from
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),  # or 'backbone'
    mimic=dict(enabled=False))  # paper: feature mimicking for classifiers

custom_hooks = [
    # scales calibrated in before_train, after load_from (min-max per channel,
    # 1st/99th percentile per token; all-reduced over GPUs): 64 batches per
    # GPU = 512 images on 8 GPUs
    dict(type='GPLQCalibrationHook', num_batches=64),
    # checkpoints that the stock test.py loads with weights_only=True
    dict(type='GPLQSafeCheckpointHook'),
]

# One epoch of AdamW at a constant LR (no warm-up, no decay). The base's
# weight-decay rules are kept; the quantizer scales get no weight decay.
train_cfg = _base_.gplq_train_cfg
param_scheduler = []
# mmdet ships Swin-S 3x only as an AMP config; stage 1 runs in FP32 (under fp16
# autocast the 4-bit fake quantization and the LSQ scale gradients would be
# computed in half precision; AmpOptimWrapper also needs a GPU).
optim_wrapper = dict(type='OptimWrapper', **_base_.gplq_optim_wrapper)
# 1 image per GPU on 8 GPUs; the LR is for that total batch of 8
# (--auto-scale-lr rescales it for another GPU count).
train_dataloader = dict(batch_size=1)
auto_scale_lr = dict(enable=False, base_batch_size=8)
default_hooks = _base_.gplq_default_hooks  # checkpoints + exact --resume

# The official checkpoint (trained with AMP). Offline: download it once and
# pass the local file with
#   --cfg-options load_from=/path/to/downloaded.pth
# If torch (>= 2.6 loads with weights_only=True) refuses the file, convert it
# once, for files you trust only:
#   python tools/convert_checkpoint.py SRC.pth DST.pth --trust
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/swin/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth'  # noqa
