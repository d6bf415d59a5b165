# Stage 1 (Act-QAT, W32A4) of the micro Mask R-CNN: the same wrapping as
# configs/gplq/gplq_mask-rcnn_swin-t-p4-w7_fpn_1x_coco_w32a4.py, on the test
# fixture (LR 1e-4 for the few micro iterations). The FP32 checkpoint is
# passed with --cfg-options load_from=... (tests set cfg.load_from).
_base_ = './mask-rcnn_swin-micro_fpn_shapes.py'
custom_imports = dict(imports=['gplq_mm'], allow_failed_imports=False)

fp32_model = _base_.model
model = dict(
    _delete_=True,
    type='GPLQModel',
    model=fp32_model,
    quant=dict(scope='whole'),
    mimic=dict(enabled=False))

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
