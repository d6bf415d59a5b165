# GPLQ stage 1 (Act-QAT, W32A4) for the tiny demo DeiT: whole model quantized
# (patch embedding input 8 bit, everything else 4 bit; q/k/v per token,
# post-softmax log-sqrt2), scales calibrated in before_train, PCA feature
# mimicking against the frozen FP32 model (on by default for classifiers, as in
# the paper), one epoch of AdamW at a constant LR: the paper's 5e-6 at batch
# 128, scaled linearly to our batch 64 (the paper's appendix A.2 rule).  (A
# first demo run used 5e-4; see docs/results.md.)  The direct-QAT baseline
# uses exactly the same settings.
#
#   python <mmpretrain>/tools/train.py configs/demo/gplq_deit-tiny_fashionmnist_w32a4.py \
#       --cfg-options load_from=work_dirs/demo/cls/fp32/fp32_safe.pth
_base_ = './deit-tiny_fashionmnist.py'

custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
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
    optimizer=dict(lr=2.5e-6, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
param_scheduler = []  # constant LR, no warm-up, no decay (paper)
auto_scale_lr = dict(enable=False, base_batch_size=128)
default_hooks = dict(checkpoint=dict(interval=1, by_epoch=True),
                     exact_resume=dict(type='GPLQExactResumeHook'),
                     drift=dict(type='GPLQDriftHook'))
load_from = None  # FP32 checkpoint: --cfg-options load_from=...
