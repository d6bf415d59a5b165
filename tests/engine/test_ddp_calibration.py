"""Stage-1 calibration under DDP (2 processes, gloo, CPU) equals a single
process over the same images.

Runs ``tools/check_ddp_calibration.py`` (a real Runner; see its docstring
for why the stock ``tools/train.py --launcher pytorch`` cannot run on a
CPU-only machine) once as one process and once under
``python -m torch.distributed.run --nproc_per_node 2``, each calibrating and
then training 2 iterations (through MMDistributedDataParallel in the
2-process run).
"""
import importlib.util
import os.path as osp
import socket

import pytest
import torch

from gplq_test_utils import (CONFIGS, DEIT_GPLQ, DET_GPLQ, REPO, run_script,
                             tail)

TOOL = osp.join(REPO, 'tools', 'check_ddp_calibration.py')


def _tool():
    spec = importlib.util.spec_from_file_location('check_ddp_calibration',
                                                  TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cfg_name, fp32, out, work, nproc, options):
    args = [TOOL, osp.join(CONFIGS, cfg_name), '--out', out, '--work-dir',
            work, '--max-iters', '2', '--cfg-options', f'load_from={fp32}'
            ] + options
    if nproc > 1:
        args = ['-m', 'torch.distributed.run', '--nproc_per_node',
                str(nproc), '--master_addr', '127.0.0.1', '--master_port',
                str(_free_port())] + args
    proc = run_script(args, cwd=REPO, env={'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, tail(proc)
    assert osp.isfile(out), tail(proc)
    return torch.load(out, weights_only=True)


# (config, batch size, calibration batches in 1 process, PCA batches)
CASES = {
    # Mask R-CNN: one image per process (COCO's 1/GPU), 8 images
    'mask-rcnn': (DET_GPLQ, 1, 8, None),
    # DeiT: batch 2, scales from 8 images, PCA teacher basis from all 16
    'deit': (DEIT_GPLQ, 2, 4, 8),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(CASES))
def test_ddp_calibration_equals_single_process(case, request, tmp_path):
    cfg_name, batch, n_single, n_pca = CASES[case]
    if case == 'deit':
        fp32 = request.getfixturevalue('deit_fp32')[0]
    else:
        fp32 = request.getfixturevalue('det_fp32')
    records = {}
    for nproc in (1, 2):
        opts = [f'train_dataloader.batch_size={batch}',
                f'custom_hooks.0.num_batches={n_single // nproc}']
        if n_pca:
            opts.append(f'model.mimic.num_batches={n_pca // nproc}')
        records[nproc] = _run(cfg_name, fp32, str(tmp_path / f'{nproc}.pth'),
                              str(tmp_path / f'work{nproc}'), nproc, opts)
    one, two = records[1], records[2]
    assert one['world_size'] == 1 and two['world_size'] == 2
    # each rank calibrated on its own shard; together the same images
    assert len(two['images_per_rank']) == 2
    r0, r1 = (set(r) for r in two['images_per_rank'])
    assert r0 and r1 and not r0 & r1
    assert r0 | r1 == set(one['images_per_rank'][0])
    # identical scales (all-reduced min/max and percentile histograms)
    assert one['initialized'] and two['initialized']
    assert set(one['scales']) == set(two['scales'])
    for k, s in one['scales'].items():
        assert torch.equal(s, two['scales'][k]), k
    if n_pca:  # the PCA teacher basis too
        assert torch.equal(one['pca'][0], two['pca'][0])
        v1, v2 = one['pca'][1], two['pca'][1]
        torch.testing.assert_close(v1 @ v1.t(), v2 @ v2.t(), rtol=0,
                                   atol=1e-6)
    # DDP training kept the ranks in sync
    assert two['ranks_agree_after_calibration']
    assert two['ranks_agree_after_training'] and two['iters'] == 2
    assert osp.isfile(tmp_path / 'work2' / 'iter_2.pth')
    assert _tool().compare(str(tmp_path / '1.pth'),
                           str(tmp_path / '2.pth')) == 0
