# GPLQ stage 1 (Act-QAT, W32A4) for the tiny demo detector.
#
# Same recipe as configs/gplq/ for COCO: wrap the FP32 model with GPLQModel
# (whole detector quantized, activations 4 bit per channel, patch embedding
# input 8 bit, q/k/v per token, post-softmax log-sqrt2), calibrate the scales
# in before_train, then one epoch of AdamW at a constant LR with FP32 weights.
#
# LR: the paper's constant 5e-6 at 8 images per step (COCO: 8 GPUs x 1 image),
# as in configs/gplq/; our batch is also 8.  (A first demo run used 1e-3, a
# "same total step budget" guess; see docs/results.md.)  The direct-QAT
# baseline (next to this file) uses exactly the same optimiser settings.
#
#   python <mmdet>/tools/train.py configs/demo/gplq_mask-rcnn_swin-tiny_fpn_shapes_w32a4.py \
#       --cfg-options load_from=work_dirs/demo/det_fp32/fp32_safe.pth
_base_ = './mask-rcnn_swin-tiny_fpn_shapes.py'

custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),
    mimic=dict(enabled=False))  # the paper uses no mimicking for detection

custom_hooks = [
    dict(type='GPLQCalibrationHook', num_batches=8),
    dict(type='GPLQSafeCheckpointHook'),
]

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=5e-6, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
param_scheduler = []  # constant LR, no warm-up, no decay (paper)
auto_scale_lr = dict(enable=False, base_batch_size=8)
# exact --resume (RNG states, no batch trained twice)
default_hooks = dict(exact_resume=dict(type='GPLQExactResumeHook'),
                     drift=dict(type='GPLQDriftHook'))
load_from = None  # FP32 checkpoint: --cfg-options load_from=...
