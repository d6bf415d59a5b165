"""A model from a config file, built as the stock test script builds it."""
import copy
from typing import Optional


def build_from_config(config: str, cfg_options: Optional[dict] = None,
                      default_scope: str = 'mmdet'):
    """``(cfg, model)``: the config's ``custom_imports`` imported, its
    default scope set, its top-level ``data_preprocessor`` merged into the
    model (where mmpretrain keeps mean/std, as mmengine's Runner does).
    ``default_scope``: the registry scope when the config sets none.  No
    checkpoint is loaded."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import import_modules_from_strings
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', default_scope))
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return cfg, MODELS.build(model_cfg)
