"""``custom_imports = dict(imports=['gplq_mm'])`` in GPLQ configs.

Our tools import gplq_mm themselves, so a stage-1 config without that line
would work with ``gplq_quantize.py`` and then fail in the stock scripts:
the tool refuses it with a message giving the line to add.  The W4A4 config
it writes always carries the import (keeping the config's own imports).  What
the stock scripts print without it (mmengine's registry error naming
GPLQModel) is checked too, as documented in docs/reliability.md.
"""
import os
import os.path as osp

import pytest
from mmengine.config import Config

from gplq_test_utils import (CONFIGS, DEIT_FP32, DEIT_GPLQ, REPO,
                             stock_script, tail)

ADD_LINE = ("add the line `custom_imports = dict(imports=['gplq_mm'], "
            'allow_failed_imports=False)` to the config')
REGISTRY_ERROR = ("KeyError: 'GPLQModel is not in the mmpretrain::model "
                  "registry. Please check whether the value of `GPLQModel` "
                  'is correct or it was registered as expected.')


def _without_custom_imports(tmp_path) -> str:
    """The micro stage-1 config as a user might write it: no custom_imports
    line (and no base config that has one)."""
    src = open(osp.join(CONFIGS, DEIT_GPLQ)).read()
    assert 'custom_imports' in src
    lines = [line for line in src.splitlines()
             if not line.startswith('custom_imports')]
    text = '\n'.join(lines).replace(
        "_base_ = './deit-micro_cls.py'",
        f'_base_ = {osp.join(CONFIGS, DEIT_FP32)!r}')
    assert 'custom_imports' not in text and DEIT_FP32 in text
    path = tmp_path / 'no_imports_w32a4.py'
    path.write_text(text)
    return str(path)


def _imports(cfg_path: str):
    cfg = Config.fromfile(cfg_path, import_custom_modules=False)
    return list(cfg.custom_imports['imports'])


def test_gplq_quantize_refuses_a_config_without_it(runs, arch, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('pre-existing')
    proc = runs.quantize(_without_custom_imports(tmp_path),
                         arch['cls'].w32a4_ckpt, '--out-dir', out,
                         cwd=tmp_path)
    assert proc.returncode != 0, tail(proc)
    assert 'Traceback' not in proc.stderr, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert len(msg) == 1, tail(proc)
    assert "uses type='GPLQModel' but its custom_imports do not import " \
        'gplq_mm' in msg[0]
    assert ADD_LINE in msg[0]
    assert sorted(os.listdir(out)) == ['keep.txt']


def test_w4a4_config_carries_it(cls_w4a4):
    assert _imports(cls_w4a4.cfg) == ['gplq_mm']
    assert Config.fromfile(
        cls_w4a4.cfg,
        import_custom_modules=False).custom_imports.allow_failed_imports is \
        False


@pytest.mark.slow
def test_repq_keeps_the_configs_own_imports(runs, arch, tmp_path):
    """A plain config with its own custom_imports (a user's plugin): the
    written W4A4 config imports both."""
    plain = tmp_path / 'plain_with_plugin.py'
    plain.write_text(
        f'_base_ = {osp.join(CONFIGS, DEIT_FP32)!r}\n'
        "custom_imports = dict(imports=['mmpretrain.models.utils'], "
        'allow_failed_imports=False)\n')
    a = arch['cls']
    out = tmp_path / 'out'
    proc = runs.quantize(plain, a.fp32_ckpt, '--method', 'repq', '--out-dir',
                         out, '--calib-images', 2, '--no-qwt', cwd=tmp_path)
    assert proc.returncode == 0, tail(proc)
    assert _imports(str(out / 'plain_with_plugin_w4a4.py')) == \
        ['mmpretrain.models.utils', 'gplq_mm']


@pytest.mark.slow
def test_stock_scripts_without_it_name_gplqmodel_and_the_registry(
        runs, arch, cls_w4a4, tmp_path):
    """What the user sees from the stock scripts (mmengine, not ours):
    exit != 0 and a KeyError naming GPLQModel and the registry."""
    proc = runs([stock_script('mmpretrain', 'train'),
                 _without_custom_imports(tmp_path), '--work-dir',
                 tmp_path / 'train', '--cfg-options',
                 f'load_from={arch["cls"].fp32_ckpt}'], cwd=REPO)
    assert proc.returncode != 0, tail(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(REGISTRY_ERROR), \
        tail(proc)

    cfg = Config.fromfile(cls_w4a4.cfg, import_custom_modules=False)
    cfg = Config({k: v for k, v in cfg.to_dict().items()
                  if k != 'custom_imports'})
    no_import = str(tmp_path / 'w4a4_no_imports.py')
    cfg.dump(no_import)
    assert 'custom_imports' not in open(no_import).read()
    proc = runs([stock_script('mmpretrain', 'test'), no_import,
                 cls_w4a4.ckpt, '--work-dir', tmp_path / 'test'], cwd=REPO)
    assert proc.returncode != 0, tail(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(REGISTRY_ERROR), \
        tail(proc)
