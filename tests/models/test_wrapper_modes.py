"""GPLQModel behaves exactly as the model it wraps when quantizers are off.

Real micro models and real data batches through the real data
preprocessors, in every mode mmengine uses: ``tensor``, ``loss``,
``predict``.
"""
import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

from gplq_mm.models.mimic import PCAAccumulator, make_teacher, pool_feature
from gplq_mm.quant import set_act_state
from gplq_test_utils import (DEIT_GPLQ, DET_GPLQ, SWIN_CLS_GPLQ, build,
                             fp32_model_cfg, load_cfg)


def _batch(cfg, which: str):
    loader_cfg = cfg[f'{which}_dataloader'].copy()
    loader_cfg['sampler'] = dict(type='DefaultSampler', shuffle=False)
    loader_cfg.pop('batch_sampler', None)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        loader = Runner.build_dataloader(loader_cfg, seed=0)
        return next(iter(loader))


def _flat(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat(x[k])]
    return []


def _close(a, b, exact: bool):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb) and fa
    for x, y in zip(fa, fb):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def _pair(cfg):
    plain = build(cfg, fp32_model_cfg(cfg), seed=1)
    wrapper = build(cfg, seed=2)
    # the plain model's checkpoint loads into the wrapper (keys remapped under
    # model.*; its missing quantizer keys are expected for an FP32 start)
    wrapper.load_state_dict(plain.state_dict(), strict=True)
    set_act_state(wrapper, 'off')
    return plain, wrapper


def _predictions(samples, det: bool):
    if det:
        return [[s.pred_instances.bboxes, s.pred_instances.scores,
                 s.pred_instances.labels, s.pred_instances.masks]
                for s in samples]
    return [s.pred_score for s in samples]


# exact: mmdet WindowMSA is the same arithmetic; mmpretrain's attention uses
# F.scaled_dot_product_attention, ours writes it out (equal up to rounding)
@pytest.mark.parametrize('name,det,exact', [(DET_GPLQ, True, True),
                                            (DEIT_GPLQ, False, False),
                                            (SWIN_CLS_GPLQ, False, True)])
def test_wrapper_equals_plain_model(name, det, exact, shapes_root, cls_root):
    cfg = load_cfg(name)
    cfg.model.mimic = dict(enabled=False)
    plain, wrapper = _pair(cfg)
    assert wrapper.data_preprocessor is wrapper.model.data_preprocessor
    assert type(wrapper.data_preprocessor) is type(plain.data_preprocessor)
    assert torch.equal(wrapper.data_preprocessor.mean,
                       plain.data_preprocessor.mean)

    with torch.no_grad():
        # tensor and predict: eval mode
        plain.eval(), wrapper.eval()
        batch = _batch(cfg, 'val')
        dp = wrapper.data_preprocessor(batch, False)
        dp_plain = plain.data_preprocessor(batch, False)
        assert torch.equal(dp['inputs'], dp_plain['inputs'])
        _close(wrapper(**dp, mode='tensor'), plain(**dp_plain, mode='tensor'),
               exact)
        pw = wrapper(**wrapper.data_preprocessor(batch, False),
                     mode='predict')
        pp = plain(**plain.data_preprocessor(batch, False), mode='predict')
        _close(_predictions(pw, det), _predictions(pp, det), exact)
        # and the stock val_step path of mmengine
        _close(_predictions(wrapper.val_step(batch), det),
               _predictions(plain.val_step(batch), det), exact)

        # loss: train mode, same RNG state for the RPN/RoI samplers
        plain.train(), wrapper.train()
        batch = _batch(cfg, 'train')
        torch.manual_seed(3)
        lw = wrapper(**wrapper.data_preprocessor(batch, True), mode='loss')
        torch.manual_seed(3)
        lp = plain(**plain.data_preprocessor(batch, True), mode='loss')
    assert sorted(lw) == sorted(lp) and 'loss_mimic' not in lw
    _close(lw, lp, exact)


def test_mimic_loss_is_zero_for_an_unquantized_student(cls_root):
    """With quantizers off the student is its FP32 teacher: the mimic loss
    is 0 and the task losses are the plain model's."""
    cfg = load_cfg(DEIT_GPLQ)
    plain, wrapper = _pair(cfg)
    assert wrapper.mimic_on
    batch = wrapper.data_preprocessor(_batch(cfg, 'train'), True)
    teacher = make_teacher(wrapper)
    acc = PCAAccumulator(32)
    store = {}
    h = wrapper.feature_module(teacher).register_forward_hook(
        lambda m, i, o: store.__setitem__('f', o))
    with torch.no_grad():
        teacher.extract_feat(batch['inputs'])
    h.remove()
    acc.update(pool_feature(store['f']))
    mean, comps, _ = acc.basis(0.6, 8)
    wrapper.set_teacher(teacher, mean, comps)
    wrapper.train(), plain.train()
    assert not teacher.training  # train() leaves the teacher in eval mode
    lw = wrapper(**batch, mode='loss')
    lp = plain(**batch, mode='loss')
    assert set(lw) == set(lp) | {'loss_mimic'}
    assert float(lw['loss_mimic']) == pytest.approx(0.0, abs=1e-8)
    _close({k: lw[k] for k in lp}, lp, exact=False)
