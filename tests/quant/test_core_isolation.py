"""The quantization core imports torch/numpy only (docs/design.md §4)."""
import ast
import glob
import os.path as osp

CORE = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                'gplq_mm', 'quant')


def test_core_imports_no_openmmlab_package():
    bad = []
    for path in glob.glob(osp.join(CORE, '*.py')):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or '']
            bad += [f'{osp.basename(path)}: {n}' for n in names
                    if n.split('.')[0].startswith('mm') or
                    n.startswith('gplq_mm.') and not n.startswith('gplq_mm.quant')]
    assert len(glob.glob(osp.join(CORE, '*.py'))) >= 6
    assert not bad, bad
