# GPLQ stage 1 (Act-QAT, W32A4) for the DINOv2 ViT-S/14 Fashion-MNIST classifier.
#
# The whole classifier is quantized (patch-embedding input 8 bit, every other
# Linear input 4 bit per channel, q/k/v per token, post-softmax log-sqrt2); the
# backbone is unfrozen (Act-QAT trains the FP32 weights together with the LSQ
# scales) and learns to mimic the frozen FP32 model in its PCA subspace (k: 60%
# of the variance, a multiple of 32), as in the paper.  One epoch of AdamW at a
# constant LR: the paper's 5e-6 at batch 128, scaled linearly to batch 32.
#
#   python <mmpretrain>/tools/train.py configs/demo/gplq_dinov2-s_fashionmnist_w32a4.py \
#       --cfg-options load_from=work_dirs/demo/dino/fp32/fp32_safe.pth
_base_ = './dinov2-s_fashionmnist.py'

custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
fp32_model.backbone.frozen_stages = -1
fp32_model.backbone.init_cfg = None  # all weights come from load_from
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),
    mimic=dict(enabled=True, var_ratio=0.6, multiple=32, weight=1.0,
               num_batches=8))

custom_hooks = [
    dict(type='GPLQCalibrationHook', num_batches=8),
    dict(type='GPLQSafeCheckpointHook'),
]
train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1.25e-6, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
param_scheduler = []  # constant LR, no warm-up, no decay (paper)
auto_scale_lr = dict(enable=False, base_batch_size=128)
default_hooks = dict(checkpoint=dict(interval=1, by_epoch=True),
                     exact_resume=dict(type='GPLQExactResumeHook'),
                     drift=dict(type='GPLQDriftHook'))
load_from = None  # FP32 checkpoint: --cfg-options load_from=...
