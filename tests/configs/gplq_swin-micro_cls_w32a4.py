# Stage 1 (Act-QAT, W32A4) of the micro Swin classifier, wrapped as
# configs/gplq/gplq_swin-*_in1k_w32a4.py (PCA feature mimicking on). For the
# micro model and data: PCA k a multiple of 8 (of 32 features), LR 1e-4.
_base_ = './swin-micro_cls.py'
custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),
    mimic=dict(enabled=True, var_ratio=0.6, multiple=8, weight=1.0,
               num_batches=2))
custom_hooks = [
    dict(type='GPLQCalibrationHook', num_batches=2),
    dict(type='GPLQSafeCheckpointHook'),
]
optim_wrapper = dict(
    optimizer=dict(lr=1e-4),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
# exact --resume (RNG states, no batch trained twice)
default_hooks = dict(exact_resume=dict(type='GPLQExactResumeHook'),
                     drift=dict(type='GPLQDriftHook'))
load_from = None
