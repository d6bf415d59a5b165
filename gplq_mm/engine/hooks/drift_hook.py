"""How far stage 1 moved the activation scales and the weights."""
from typing import Dict, Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from gplq_mm.quant import iter_act_quantizers


def _relative_changes(ref: Dict[str, torch.Tensor],
                      now: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([
        (now[k].float() - v).norm() / v.norm().clamp_min(1e-12)
        for k, v in ref.items()
    ]) if ref else torch.zeros(0)


def _summary(x: torch.Tensor) -> str:
    if x.numel() == 0:
        return 'none'
    return (f'median {float(x.median()):.2e}, max {float(x.max()):.2e} '
            f'over {x.numel()}')


@HOOKS.register_module()
class GPLQDriftHook(Hook):
    """Log how far training moved the activation scales and the weights.

    A reference copy (on the CPU, main process only: DDP ranks hold the same
    values) of every learnable activation scale and every trainable weight is
    taken in ``before_train``, after
    ``GPLQCalibrationHook`` (priority ``HIGH``) has calibrated the scales;
    after each training epoch the hook logs, per group, the median and
    largest relative change ``||x - x_0|| / ||x_0||`` per tensor.  With
    AdamW each entry moves by about the LR per step, whatever the gradient,
    so a few hundred steps at the paper's 5e-6 leave the model where the
    calibration put it; this makes that visible.  After ``--resume`` the
    reference is the resumed state (the log says so).  Priority ``LOW``.
    """

    priority = 'LOW'

    def __init__(self):
        self._scales: Optional[Dict[str, torch.Tensor]] = None
        self._weights: Optional[Dict[str, torch.Tensor]] = None
        self._since = 'calibration'

    @staticmethod
    def _model(runner):
        m = runner.model
        return m.module if is_model_wrapper(m) else m

    @torch.no_grad()
    def _current(self, runner):
        model = self._model(runner)
        scales = {n: q.scale.detach().cpu().clone()
                  for n, q in iter_act_quantizers(model)
                  if isinstance(q.scale, torch.nn.Parameter)
                  and q.scale.requires_grad}
        weights = {n: p.detach().cpu().clone()
                   for n, p in model.named_parameters()
                   if p.requires_grad and n.endswith('weight')}
        return scales, weights

    def before_train(self, runner) -> None:
        if not is_main_process():
            return
        self._scales, self._weights = self._current(runner)
        self._since = 'calibration' if runner.iter == 0 else \
            f'the resumed state (iteration {runner.iter})'

    def after_train_epoch(self, runner) -> None:
        if self._scales is None:
            return
        scales, weights = self._current(runner)
        # (runner.epoch counts finished epochs only after this hook)
        ds = _relative_changes(self._scales, scales)
        dw = _relative_changes(self._weights, weights)
        runner.logger.info(
            f'GPLQ drift after epoch {runner.epoch + 1}: activation scales '
            f'{_summary(ds)}; weights {_summary(dw)} '
            f'(relative change since {self._since}, per tensor).')
        runner.message_hub.update_scalar('gplq/scale_drift_median',
                                         float(ds.median()) if ds.numel() else 0.0)
        runner.message_hub.update_scalar('gplq/weight_drift_median',
                                         float(dw.median()) if dw.numel() else 0.0)
