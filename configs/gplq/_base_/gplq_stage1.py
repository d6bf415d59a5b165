# The stage-1 (Act-QAT, W32A4) recipe shared by configs/gplq/*.
#
# mmengine does not allow two bases to define the same key, and the official
# mmdet/mmpretrain base of every config already defines train_cfg,
# optim_wrapper, default_hooks, ...; so this fragment defines them under
# gplq_* names and each config (listing both bases) assigns them:
#   _base_ = ['mmdet::...', './_base_/gplq_stage1.py']
#   train_cfg = _base_.gplq_train_cfg
# An assigned dict is merged into the official base's, as if written there.

# One epoch of AdamW at a constant LR of 5e-6 (no warm-up, no decay). The
# base's weight-decay rules (and gradient clipping) are kept; the quantizer
# scales get no weight decay.
gplq_train_cfg = dict(
    _delete_=True, type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
gplq_optim_wrapper = dict(
    optimizer=dict(lr=5e-6),
    paramwise_cfg=dict(custom_keys={'_quant.scale': dict(decay_mult=0.0)}))
# Stochastic depth off for the one epoch: each config sets
#   fp32_model.backbone.drop_path_rate = _base_.gplq_drop_path_rate
# The official bases train with 0.1-0.5. The epoch is there to fit the
# activation scales in the FP32 model's basin, and the FP32 teacher runs
# without it; on the DINOv2 demo, 0.2 cost 5 points of W32A4 and 10 of W4A4
# top-1 on the validation split, 3 seeds (docs/ablation.md §7).
gplq_drop_path_rate = 0.0
# A checkpoint per epoch; GPLQExactResumeHook makes --resume continue exactly
# where the run stopped (RNG states, no batch trained twice).
gplq_default_hooks = dict(
    checkpoint=dict(
        type='CheckpointHook', interval=1, by_epoch=True, save_last=True),
    exact_resume=dict(type='GPLQExactResumeHook'),
    drift=dict(type='GPLQDriftHook'))
