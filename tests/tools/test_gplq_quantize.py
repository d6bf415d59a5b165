"""tools/gplq_quantize.py from the command line, as a user runs it.

stage-1 checkpoint -> ``python tools/gplq_quantize.py`` -> the stock
``tools/test.py`` of mmdet / mmpretrain on the written W4A4 config and
checkpoint.  The metrics printed by the stock script must equal an in-process
evaluation of the same files (``Runner.from_cfg(...).test()``), and so must
the raw predictions (``--out``).  Bad input must fail with exit code != 0, a
one-line ``gplq_quantize: error: ...`` naming problem and fix, no traceback,
and leave --out-dir as it was.
"""
import json
import os
import os.path as osp
import pickle

import pytest
import torch
from gplq_test_utils import last_metrics, load_cfg, stock_script, tail

# metrics as the stock scripts print them
METRIC_PREFIX = dict(det='coco', cls='accuracy')
DUMP = dict(det=('mmdet.evaluation', 'DumpDetResults'),
            cls=('mmengine.evaluator', 'DumpResults'))


def quantize_ok(runs, *args, cwd):
    proc = runs.quantize(*args, cwd=cwd)
    assert proc.returncode == 0, tail(proc)
    assert 'Traceback' not in proc.stderr, tail(proc)
    return proc


def outputs(out_dir, name):
    base = osp.join(str(out_dir), f'{name}_w4a4')
    return {ext: f'{base}.{ext}' for ext in ('py', 'pth', 'json', 'log')}


def stock_test(runs, a, cfg, ckpt, work_dir, pred_file):
    proc = runs([stock_script(a.package, 'test'), cfg, ckpt, '--work-dir',
                 work_dir, '--out', pred_file], cwd=osp.dirname(work_dir))
    assert proc.returncode == 0, tail(proc)
    metrics = last_metrics(proc.stdout + proc.stderr, METRIC_PREFIX[a.name])
    assert metrics, tail(proc)
    return metrics


def in_process_test(a, cfg_path, ckpt, work_dir, pred_file):
    """What tools/test.py does, in this process: Runner.from_cfg + test()."""
    import importlib

    from mmengine.runner import Runner
    cfg = load_cfg(cfg_path, work_dir=work_dir)
    cfg.load_from = ckpt
    runner = Runner.from_cfg(cfg)
    module, cls = DUMP[a.name]
    dump = getattr(importlib.import_module(module), cls)
    runner.test_evaluator.metrics.append(dump(out_file_path=pred_file))
    return runner.test()


def load_preds(path):
    with open(path, 'rb') as f:  # written by this test session
        return pickle.load(f)


def assert_same_predictions(name, p1, p2):
    assert len(p1) == len(p2) > 0
    if name == 'det':  # random weights still give (low-score) detections
        assert sum(len(r['pred_instances']['scores']) for r in p1) > 0
    keys = dict(det=('bboxes', 'scores', 'labels'),
                cls=('pred_score', 'pred_label'))[name]
    for r1, r2 in zip(p1, p2):
        s1 = r1.get('pred_instances', r1)
        s2 = r2.get('pred_instances', r2)
        for k in keys:
            torch.testing.assert_close(torch.as_tensor(s1[k]),
                                       torch.as_tensor(s2[k]), rtol=1e-5,
                                       atol=1e-5)
        if 'masks' in s1:  # RLE-encoded, compare the encodings
            assert [m['counts'] for m in s1['masks']] == \
                [m['counts'] for m in s2['masks']]


def check_w4a4_files(files, source_ckpt, report_blocks):
    """Checkpoint: smaller, weights_only-loadable, packed int4; JSON report
    with per-layer and per-block entries; no temporary file left."""
    for path in files.values():
        assert osp.isfile(path), path
    out_dir = osp.dirname(files['pth'])
    assert not [f for f in os.listdir(out_dir) if '.tmp' in f]
    assert osp.getsize(files['pth']) < osp.getsize(source_ckpt)
    ckpt = torch.load(files['pth'], map_location='cpu', weights_only=True)
    sd, meta = ckpt['state_dict'], ckpt['meta']
    packed = {k: v for k, v in sd.items() if k.endswith('.weight_packed')}
    assert packed and all(v.dtype == torch.uint8 for v in packed.values())
    assert not any(k.endswith('.weight') and k[:-len('weight')] +
                   'weight_packed' in sd for k in sd)
    assert meta['gplq']['w_bits'] == 4 and meta['gplq']['a_bits'] == 4
    import json
    with open(files['json']) as f:
        report = json.load(f)
    layers, blocks = report['report']['layers'], report['report']['blocks']
    assert len(layers) == report['integer_layers'] == len(packed)
    assert {r['name'] for r in layers} == \
        {k[len('model.'):-len('.weight_packed')] for k in packed}
    assert all(0 <= r['rel_error'] < 1 and r['shape'] for r in layers)
    assert [b['name'] for b in blocks] == report_blocks
    for b in blocks:
        assert set(b) >= {'kept', 'r2', 'err_before', 'err_after', 'rows'}
    assert report['qwt_blocks_kept'] == sum(b['kept'] for b in blocks)
    assert report['w4a4_checkpoint_bytes'] == osp.getsize(files['pth'])
    return ckpt, report


DET_BLOCKS = [f'backbone.stages.{i}.blocks.{j}'
              for i, n in enumerate((1, 1, 2, 1)) for j in range(n)]
CLS_BLOCKS = ['backbone.layers.0', 'backbone.layers.1']


@pytest.mark.slow
@pytest.mark.parametrize('name,blocks', [('det', DET_BLOCKS),
                                         ('cls', CLS_BLOCKS)])
def test_stage2_then_stock_test_script(runs, arch, tmp_path, name, blocks):
    """W32A4 -> gplq_quantize.py -> stock test.py == in-process evaluation."""
    a = arch[name]
    out = tmp_path / 'w4a4'
    proc = quantize_ok(runs, a.stage1_cfg, a.w32a4_ckpt, '--out-dir', out,
                       '--calib-images', 4, '--batch-size', 2, cwd=tmp_path)
    files = outputs(out, osp.splitext(osp.basename(a.stage1_cfg))[0])
    ckpt, report = check_w4a4_files(files, a.w32a4_ckpt, blocks)
    assert report['method'] == 'gplq'
    # the default fold shifts the activation codes; the W4A4 config says so
    assert ckpt['meta']['gplq']['fold'] == 'pow2'
    assert any(k.endswith('.input_shift') for k in ckpt['state_dict'])
    # a progress bar (count, ETA) per QwT block; time per block in the report
    assert f'QwT block 1/{len(blocks)} {blocks[0]}: 2 calibration batches' \
        in proc.stdout + proc.stderr
    assert '2/2' in proc.stdout and 'ETA' in proc.stdout
    secs = [b['seconds'] for b in report['report']['blocks']]
    assert all(t > 0 for t in secs) and sum(secs) <= report['ptq_seconds']
    # time and memory per phase, in order; the RSS peak never decreases
    phases = report['phases']
    assert list(phases) == ['load', 'weight_ptq', 'export', 'self_check']
    assert all(p['seconds'] > 0 for p in phases.values())
    assert phases['weight_ptq']['seconds'] >= report['ptq_seconds']
    rss = [p['peak_rss_mib'] for p in phases.values()]
    assert rss == sorted(rss) and rss[-1] <= report['peak_rss_mib']
    assert 'self_check: ' in proc.stdout + proc.stderr

    stock = stock_test(runs, a, files['py'], files['pth'],
                       str(tmp_path / 'stock'), str(tmp_path / 'stock.pkl'))
    ours = in_process_test(a, files['py'], files['pth'],
                           str(tmp_path / 'inproc'),
                           str(tmp_path / 'inproc.pkl'))
    assert set(stock) <= set(ours)
    for k, v in stock.items():  # as printed: 4 decimals
        assert round(float(ours[k]), 4) == pytest.approx(v, abs=1e-9), k
    assert_same_predictions(name, load_preds(str(tmp_path / 'stock.pkl')),
                            load_preds(str(tmp_path / 'inproc.pkl')))


@pytest.mark.slow
def test_repq_from_fp32_with_plain_config(runs, arch, tmp_path):
    """--method repq: FP32 checkpoint + unwrapped mmpretrain config; the
    written config is evaluated by the stock script."""
    a = arch['cls']
    out = tmp_path / 'repq'
    quantize_ok(runs, a.plain_cfg, a.fp32_ckpt, '--method', 'repq',
                '--out-dir', out, '--calib-images', 8, '--batch-size', 4,
                cwd=tmp_path)
    files = outputs(out, osp.splitext(osp.basename(a.plain_cfg))[0])
    ckpt, report = check_w4a4_files(files, a.fp32_ckpt, CLS_BLOCKS)
    assert report['method'] == 'repq'
    assert ckpt['meta']['gplq']['calib_images'] == 8
    assert list(report['phases']) == ['load', 'calibration', 'weight_ptq',
                                      'export', 'self_check']
    assert report['phases']['calibration']['seconds'] <= \
        report['calib_seconds']
    # calibrated on *normalised* images, as the stock test script feeds them
    # (mmpretrain keeps mean/std in the top-level data_preprocessor): the
    # 8-bit patch-embedding input scale is ~max|x|/127 with |x| < 3, not ~2
    sd = ckpt['state_dict']
    s = sd['model.backbone.patch_embed.projection.act_quant.scale']
    assert float(s.max()) < 0.05
    cfg_text = open(files['py']).read()
    assert "type='GPLQModel'" in cfg_text and 'w4a4=' in cfg_text
    metrics = stock_test(runs, a, files['py'], files['pth'],
                         str(tmp_path / 'stock'), str(tmp_path / 'p.pkl'))
    assert 0 <= metrics['accuracy/top1'] <= 100


@pytest.mark.slow
@pytest.mark.parametrize('name,images', [('cls', 8), ('det', 1)])
def test_repqvit_from_fp32_then_stock_test(runs, arch, tmp_path, name,
                                           images):
    """--method repqvit (the RepQ-ViT baseline as its public code does it):
    FP32 checkpoint + plain config -> a simulated W4A4 model (asymmetric
    per-tensor inputs, LayerNorms reparameterized, weights on their 4-bit
    grid) that the stock test script evaluates."""
    a = arch[name]
    out = tmp_path / 'repqvit'
    proc = quantize_ok(runs, a.plain_cfg, a.fp32_ckpt, '--method', 'repqvit',
                       '--out-dir', out, '--calib-images', images,
                       cwd=tmp_path)
    assert 'no QwT' in proc.stdout + proc.stderr
    files = outputs(out, osp.splitext(osp.basename(a.plain_cfg))[0])
    report = json.load(open(files['json']))
    assert report['method'] == 'repqvit' and report['simulated']
    assert report['repqvit']['reparameterized'] > 0
    ckpt = torch.load(files['pth'], weights_only=True)
    sd, fp32 = ckpt['state_dict'], torch.load(a.fp32_ckpt,
                                              weights_only=True)['state_dict']
    zps = [k for k in sd if k.endswith('act_quant.zero_point')]
    assert zps and all(sd[k].numel() == 1 for k in zps)  # all per tensor
    assert not any('weight_packed' in k for k in sd)
    norm = [k for k in fp32 if k.endswith(('ln1.weight', 'norm1.weight'))][0]
    assert not torch.equal(sd['model.' + norm], fp32[norm])  # reparameterized
    for k, w in sd.items():  # every quantized weight: <= 16 values per row
        if k.endswith('.weight') and k[:-len('weight')] + 'act_quant.scale' \
                in sd and w.ndim >= 2:
            rows = w.reshape(w.shape[0], -1)
            assert max(len(torch.unique(r)) for r in rows) <= 16, k
    cfg_text = open(files['py']).read()
    assert 'zero_point=True' in cfg_text and 'per_channel' not in cfg_text
    assert 'w4a4=' not in cfg_text
    metrics = stock_test(runs, a, files['py'], files['pth'],
                         str(tmp_path / 'stock'), str(tmp_path / 'p.pkl'))
    assert metrics


@pytest.mark.slow
def test_repqvit_from_a_stage1_checkpoint_with_drop_path(runs, arch,
                                                         tmp_path):
    """--method repqvit on a W32A4 checkpoint and its stage-1 config: the
    stage-1 scales (another placement) are left out and recalibrated, and
    calibration runs in eval mode (drop-path on in the config would
    otherwise perturb the ranges and fail the self-check)."""
    a = arch['cls']
    out = tmp_path / 'repqvit'
    proc = quantize_ok(runs, a.stage1_cfg, a.w32a4_ckpt, '--method', 'repqvit',
                       '--out-dir', out, '--calib-images', 8, '--cfg-options',
                       'model.model.backbone.drop_path_rate=0.1', cwd=tmp_path)
    assert 'recalibrated from scratch' in proc.stdout + proc.stderr
    files = outputs(out, osp.splitext(osp.basename(a.stage1_cfg))[0])
    assert json.load(open(files['json']))['simulated']


# --------------------------------------------------------------------------
# bad input: clear message, exit code != 0, nothing left in --out-dir
# --------------------------------------------------------------------------
@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / 'out'
    d.mkdir()
    (d / 'keep.txt').write_text('pre-existing')
    return d


def fails(runs, args, out_dir, cwd, *expected):
    proc = runs.quantize(*args, '--out-dir', out_dir, cwd=cwd)
    assert proc.returncode != 0, tail(proc)
    assert 'Traceback' not in proc.stderr, tail(proc)
    msg = [line for line in proc.stderr.splitlines()
           if line.startswith('gplq_quantize: error: ')]
    assert len(msg) == 1, tail(proc)
    for text in expected:
        assert text in msg[0], msg[0]
    if osp.isdir(out_dir):
        assert sorted(os.listdir(out_dir)) == ['keep.txt'], tail(proc)
    return msg[0]


@pytest.fixture(scope='session')
def cls_wide(make_arch, tmp_path_factory):
    """Stage-1 checkpoint of a wider DeiT (embed_dims 48 instead of 32)."""
    return make_arch('cls', tmp_path_factory.mktemp('wide'),
                     **{'backbone.arch.embed_dims': 48,
                        'head.in_channels': 48})


def test_checkpoint_of_other_size(runs, arch, cls_wide, out_dir, tmp_path):
    fails(runs, [arch['cls'].stage1_cfg, cls_wide.w32a4_ckpt], out_dir,
          tmp_path, 'does not match the GPLQ model',
          'shape mismatch (checkpoint vs model)',
          'model.backbone.cls_token (1, 1, 48) vs model (1, 1, 32)',
          'stage-1 config it was trained with')


def test_checkpoint_of_other_architecture(runs, arch, out_dir, tmp_path):
    fails(runs, [arch['cls'].stage1_cfg, arch['det'].w32a4_ckpt], out_dir,
          tmp_path, 'Checkpoint does not match', 'missing model keys',
          'unexpected keys: model.neck.')


def test_plain_config_needs_repq(runs, arch, out_dir, tmp_path):
    fails(runs, [arch['cls'].plain_cfg, arch['cls'].w32a4_ckpt], out_dir,
          tmp_path, 'does not wrap its model with GPLQModel',
          'use --method repq')


def test_fp32_checkpoint_needs_stage1(runs, arch, out_dir, tmp_path):
    fails(runs, [arch['cls'].stage1_cfg, arch['cls'].fp32_ckpt], out_dir,
          tmp_path, 'has no activation scales', 'Run stage 1 (Act-QAT) first')


@pytest.mark.parametrize('num,expected', [
    ('0', ['--calib-images 0: use at least 1 calibration image']),
    ('17', ['--calib-images 17 is larger than the training set (16 images)',
            'pass --calib-images 16 or fewer']),
])
def test_calib_images_out_of_range(runs, arch, out_dir, tmp_path, num,
                                   expected, cls_root):
    n_train = sum(len(fs) for _, _, fs in os.walk(osp.join(cls_root, 'train')))
    assert n_train == 16
    a = arch['cls']
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt, '--calib-images', num], out_dir,
          tmp_path, *expected)


def test_w_bits_out_of_range(runs, arch, out_dir, tmp_path):
    a = arch['cls']
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt, '--w-bits', '9'], out_dir,
          tmp_path, '--w-bits 9', 'use an integer from 2 to 8')


@pytest.mark.parametrize('where', ['file', 'under_file'])
def test_out_dir_not_a_directory(runs, arch, tmp_path, where):
    a = arch['cls']
    f = tmp_path / 'a_file'
    f.write_text('x')
    target = f if where == 'file' else f / 'sub'
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt], target, tmp_path,
          f'{f} exists and is not a directory', 'pass a directory path')
    assert f.read_text() == 'x'


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_out_dir_read_only(runs, arch, tmp_path):
    a = arch['cls']
    d = tmp_path / 'ro'
    d.mkdir(mode=0o500)
    try:
        fails(runs, [a.stage1_cfg, a.w32a4_ckpt], d, tmp_path,
              'is not writable', 'choose another directory')
    finally:
        d.chmod(0o700)


def test_truncated_checkpoint(runs, arch, out_dir, tmp_path):
    a = arch['cls']
    data = open(a.w32a4_ckpt, 'rb').read()
    bad = tmp_path / 'half.pth'
    bad.write_bytes(data[:len(data) // 2])
    fails(runs, [a.stage1_cfg, bad], out_dir, tmp_path,
          'half.pth is not a readable torch checkpoint',
          'truncated or corrupted')


def test_out_dir_created_by_failed_run_is_removed(runs, arch, tmp_path):
    a = arch['cls']
    target = tmp_path / 'new' / 'deeper'
    fails(runs, [a.stage1_cfg, a.fp32_ckpt], target, tmp_path,
          'has no activation scales')
    assert not (tmp_path / 'new').exists()


@pytest.mark.slow
def test_w4a4_checkpoint_with_stage1_config(runs, arch, tmp_path):
    """The stock test script refuses a W4A4 checkpoint with the W32A4 config
    (instead of silently evaluating an unloaded model)."""
    a = arch['cls']
    out = tmp_path / 'q'
    quantize_ok(runs, a.stage1_cfg, a.w32a4_ckpt, '--out-dir', out,
                '--calib-images', 4, '--no-qwt', cwd=tmp_path)
    files = outputs(out, osp.splitext(osp.basename(a.stage1_cfg))[0])
    assert open(files['json']).read().count('"kept"') == 0  # --no-qwt
    proc = runs([stock_script(a.package, 'test'), a.stage1_cfg, files['pth'],
                 '--work-dir', tmp_path / 'wd'], cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(
        'gplq_mm.models.gplq_model.CheckpointMismatchError'), tail(proc)
    assert 'weight_packed' in err and '_w4a4.py config' in err


def test_calibration_data_missing(runs, arch, out_dir, tmp_path):
    a = arch['cls']
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt, '--cfg-options',
                 f'train_dataloader.dataset.data_root={tmp_path}/nowhere/'],
          out_dir, tmp_path, 'calibration data not found', 'nowhere/train',
          '--cfg-options train_dataloader.dataset.data_root=DIR/')


def test_spill_dir_missing(runs, arch, out_dir, tmp_path):
    a = arch['cls']
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt, '--qwt-spill-dir',
                 str(tmp_path / 'nowhere')], out_dir, tmp_path,
          'nowhere: not a directory', 'create it')


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is visible')
@pytest.mark.parametrize('device,expected', [
    ('cuda', ['--device cuda: no CUDA device is visible', 'use --device cpu']),
    ('tpu0', ['--device tpu0: not a device', 'auto, cpu, cuda or cuda:N']),
])
def test_device_unusable(runs, arch, out_dir, tmp_path, device, expected):
    a = arch['cls']
    fails(runs, [a.stage1_cfg, a.w32a4_ckpt, '--device', device], out_dir,
          tmp_path, *expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_stage2_on_cuda(runs, arch, tmp_path):
    """Stage 2 runs on the GPU and writes a checkpoint like the CPU's: the
    stage-1 activation scales unchanged, the weight scales close (the MSE
    clipping search and QwT see float sums in another order)."""
    a = arch['cls']
    sds = {}
    for dev in ('cpu', 'cuda'):
        out = tmp_path / dev
        quantize_ok(runs, a.stage1_cfg, a.w32a4_ckpt, '--out-dir', out,
                    '--calib-images', '4', '--device', dev, '--name', 'g',
                    cwd=tmp_path)
        files = outputs(out, 'g')
        with open(files['json']) as f:
            assert json.load(f)['device'].startswith(dev)
        sds[dev] = torch.load(files['pth'], map_location='cpu',
                              weights_only=True)['state_dict']
    scales = [k for k in sds['cpu'] if k.endswith('act_quant.scale')]
    assert scales
    for k in scales:
        assert torch.equal(sds['cpu'][k], sds['cuda'][k]), k
    for k in (k for k in sds['cpu'] if k.endswith('weight_scale')):
        torch.testing.assert_close(sds['cpu'][k], sds['cuda'][k], rtol=0.05,
                                   atol=0, msg=k)
