"""A checkpoint whose tensors have other shapes is a hard error, not an
mmengine warning followed by an evaluation of half-random weights."""
import pytest
import torch
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import load_state_dict

from gplq_mm.models.gplq_model import CheckpointMismatchError
from gplq_test_utils import DET_GPLQ, load_cfg


def test_shape_mismatch_raises_and_names_the_tensor(shapes_root):
    cfg = load_cfg(DET_GPLQ)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in sd if k.endswith('attn.w_msa.qkv.weight'))
    sd[key] = torch.zeros(sd[key].shape[0] + 3, sd[key].shape[1])
    with pytest.raises(CheckpointMismatchError, match='shape mismatch') as e:
        load_state_dict(model, sd)
    assert key in str(e.value)
    # the same state dict with the right shape loads (the check is not noise)
    sd[key] = model.state_dict()[key].clone()
    load_state_dict(model, sd)
