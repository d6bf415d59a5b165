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
# A checkpoint per epoch; GPLQExactResumeHook makes --resume continue exactly
# where the run stopped (RNG states, no batch trained twice).
gplq_default_hooks = dict(
    checkpoint=dict(
        type='CheckpointHook', interval=1, by_epoch=True, save_last=True),
    exact_resume=dict(type='GPLQExactResumeHook'),
    drift=dict(type='GPLQDriftHook'))
