# Stage 1 (Act-QAT, W32A4) of the micro DINOv2 classifier, wrapped as
# configs/demo/gplq_dinov2-s_fashionmnist_w32a4.py; LR 1e-4 for a visible move.
_base_ = './dinov2-micro_cls.py'
custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
fp32_model.backbone.frozen_stages = -1
fp32_model.backbone.init_cfg = None
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),
    mimic=dict(enabled=True, var_ratio=0.6, multiple=32, weight=1.0,
               num_batches=2))
custom_hooks = [
    dict(type='GPLQCalibrationHook', num_batches=2),
    dict(type='GPLQSafeCheckpointHook'),
]
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
# exact --resume (RNG states, no batch trained twice)
default_hooks = dict(exact_resume=dict(type='GPLQExactResumeHook'),
                     drift=dict(type='GPLQDriftHook'))
load_from = None
