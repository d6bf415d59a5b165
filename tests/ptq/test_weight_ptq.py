"""Stage 2 on tiny real models: integer conversion, W4A4 structure, QwT."""
import copy
import importlib

import pytest
import torch
from torch import nn

from gplq_mm.ptq import build_w4a4_structure, transformer_blocks
from gplq_mm.ptq.convert import QwTMixin, float_layers, integer_fold
from gplq_mm.ptq.weight_ptq import _chain_glue, integer_layers
from gplq_mm.quant import (IntQConv2d, IntQLinear, QConv2d, QLinear,
                           WeightQuantConfig)

CASES = ['det', 'cls']


@pytest.fixture(params=CASES)
def converted(request):
    """(calibrated W32A4 case, converted model, report) per architecture."""
    case = request.getfixturevalue(f'{request.param}_case')
    model, report = request.getfixturevalue(f'{request.param}_converted')
    return case, model, report


def kept_blocks(report):
    return [b.name for b in report.blocks if b.kept]


def capture_block_io(model, block, batches, run):
    """(args, kwargs, output) of every call of ``block`` over ``batches``."""
    calls = []
    h = block.register_forward_hook(
        lambda m, a, kw, out: calls.append((a, kw, out)), with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                run(b)
    finally:
        h.remove()
    return calls


# --------------------------------------------------------------------------
# every quantized layer becomes integer
# --------------------------------------------------------------------------
def test_every_quantized_layer_is_integer(converted):
    case, model, report = converted
    before = {n: m for n, m in case.model.model.named_modules()
              if isinstance(m, (QLinear, QConv2d))}
    assert before and float_layers(model.model) == []
    ints = integer_layers(model.model)
    assert sorted(ints) == sorted(before)  # same names, one to one
    for name, m in ints.items():
        assert isinstance(m, IntQLinear if isinstance(before[name], QLinear)
                          else IntQConv2d), name
        assert m.weight_packed.dtype == torch.uint8  # packed int4 codes
        assert not hasattr(m, 'weight')  # no float weight is kept
    assert sorted(r.name for r in report.layers) == sorted(before)
    # the only float Linears left are QwT compensations of kept blocks
    qwt = {f'{b}.qwt' for b in kept_blocks(report)}
    lin = {n for n, m in model.model.named_modules() if type(m) is nn.Linear}
    assert lin == qwt


def test_w8_stores_int8_codes(cls_case):
    model, report = cls_case.convert(w_cfg=WeightQuantConfig(bits=8),
                                     qwt=False)
    assert report.blocks == []  # --no-qwt
    for m in integer_layers(model.model).values():
        assert m.w_bits == 8 and m.weight_packed.dtype == torch.int8
        assert m.weight_packed.shape == m.weight_shape[:1] + (
            int(torch.Size(m.weight_shape[1:]).numel()), )


# --------------------------------------------------------------------------
# the W4A4 config builds the same structure as the conversion
# --------------------------------------------------------------------------
def test_w4a4_structure_matches_converted_state_dict(converted, make_model):
    case, model, report = converted
    kept = kept_blocks(report)
    assert integer_fold(model.model) == 'pow2'  # the default
    fresh = make_model(case.cfg, w4a4=dict(w_bits=4, qwt_blocks=kept,
                                           fold='pow2'))
    got = fresh.state_dict()
    ref = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
    # ... so the checkpoint loads strictly and computes the same thing
    fresh.load_state_dict(ref, strict=True)
    fresh.eval()
    batch = case.batches[0]
    with torch.no_grad():
        a = model.model.extract_feat(model.data_preprocessor(batch)['inputs'])
        b = fresh.model.extract_feat(fresh.data_preprocessor(batch)['inputs'])
    for x, y in zip(a if isinstance(a, (list, tuple)) else [a],
                    b if isinstance(b, (list, tuple)) else [b]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_build_w4a4_structure_in_place(det_case, make_model):
    """The library entry point used by GPLQModel(w4a4=...)."""
    fresh = make_model(det_case.cfg)
    names = [n for n, _ in transformer_blocks(fresh.model)]
    build_w4a4_structure(fresh, w_bits=4, qwt_blocks=names[:1])
    assert float_layers(fresh.model) == []
    assert isinstance(fresh.model.get_submodule(names[0]), QwTMixin)
    assert not any(isinstance(fresh.model.get_submodule(n), QwTMixin)
                   for n in names[1:])
    # W4A4 configs written before --fold have no `fold`: 'full', no shifts,
    # so their checkpoints load with the keys they have
    assert integer_fold(fresh.model) == 'full'
    shifted = make_model(det_case.cfg)
    build_w4a4_structure(shifted, w_bits=4, fold='pow2')
    assert integer_fold(shifted.model) == 'pow2'
    with pytest.raises(ValueError, match='w4a4.fold'):
        build_w4a4_structure(make_model(det_case.cfg), fold='half')
    with pytest.raises(ValueError, match='not a transformer block'):
        build_w4a4_structure(make_model(det_case.cfg),
                             qwt_blocks=['backbone.stages.9.blocks.0'])


# --------------------------------------------------------------------------
# QwT
# --------------------------------------------------------------------------
def test_kept_and_skipped_blocks(converted):
    """A block is compensated iff its held-out fit helped (report.kept)."""
    case, model, report = converted
    names = [n for n, _ in transformer_blocks(model.model)]
    assert [b.name for b in report.blocks] == names  # all, in forward order
    for b in report.blocks:
        block = model.model.get_submodule(b.name)
        assert b.kept == (b.err_after < b.err_before), b
        assert isinstance(block, QwTMixin) == b.kept, b.name
        assert hasattr(block, 'qwt') == b.kept, b.name
        assert b.rows > 0 and b.exact
    assert any(b.kept for b in report.blocks)


def test_unhelpful_fit_is_skipped(det_converted, make_model, det_case):
    """Blocks whose held-out error the fit would increase get no compensation
    and are left out of ``qwt_blocks`` (the micro detector, 4 images, has
    both kinds with the default lambda)."""
    model, report = det_converted
    skipped = [b for b in report.blocks if not b.kept]
    assert skipped and len(skipped) < len(report.blocks)
    for b in skipped:
        assert b.err_after >= b.err_before and b.r2 <= 0
        assert not any(k.startswith(b.name + '.qwt.')
                       for k in model.state_dict())
    fresh = make_model(det_case.cfg,
                       w4a4=dict(w_bits=4, qwt_blocks=kept_blocks(report)))
    for b in skipped:
        assert not hasattr(fresh.model.get_submodule(b.name), 'qwt')


def test_compensated_block_output(det_case, det_converted):
    """y = block(x) + W_c x + b_c, seen through a forward hook."""
    model, report = det_converted
    name = kept_blocks(report)[0]
    block = model.model.get_submodule(name)
    calls = capture_block_io(model, block, det_case.batches[:1],
                             det_case.backbone_runner(model))
    assert calls
    w, bias = block.qwt.weight, block.qwt.bias
    assert w.abs().sum() > 0
    for args, kwargs, out in calls:
        x = args[0]
        with torch.no_grad():
            plain = super(QwTMixin, block).forward(*args, **kwargs)
        torch.testing.assert_close(out, plain + x @ w.t() + bias)


def test_qwt_reduces_error_of_kept_blocks(det_case, det_converted):
    """Report: held-out error drops for kept blocks.  Recomputed: on all
    calibration rows, the compensated block is closer to the FP32-weight block
    (A4 inputs) than the uncompensated one."""
    model, report = det_converted
    for b in report.blocks:
        assert (b.err_after < b.err_before) == b.kept
        assert b.r2 == pytest.approx(1 - b.err_after / b.err_before)
    kept = kept_blocks(report)
    assert kept
    w32 = det_case.model  # same weights before stage 2
    for name in kept:
        block = model.model.get_submodule(name)
        fp_block = w32.model.get_submodule(name)
        calls = capture_block_io(model, block, det_case.batches,
                                 det_case.backbone_runner(model))
        err_q = err_c = 0.0
        with torch.no_grad():
            for args, kwargs, out in calls:
                y_fp = fp_block(*args, **kwargs)
                y_q = super(QwTMixin, block).forward(*args, **kwargs)
                err_q += float(((y_fp - y_q).double()**2).sum())
                err_c += float(((y_fp - out).double()**2).sum())
        assert err_c < err_q, name


@pytest.fixture
def record_fits(monkeypatch):
    """Record the (fit, held-out) QwT sums passed to fit_qwt, per block."""
    # (the package exports a function of the same name as the module)
    wp = importlib.import_module('gplq_mm.ptq.weight_ptq')
    calls = []

    def recording(fit, held, lam):
        result = real(fit, held, lam)
        total = fit.add(held) if held is not None and held.n else fit
        calls.append((total, result))
        return result

    real = wp.fit_qwt
    monkeypatch.setattr(wp, 'fit_qwt', recording)
    return calls


def test_streaming_is_batch_partition_independent(det_case, record_fits):
    """Batch size 1 vs 2 over the same 4 images.

    Batches alternate between the fit and held-out accumulators, so the two
    runs split the images differently ({0,2}/{1,3} vs {0,1}/{2,3}) and the
    keep/skip decision of a block may legitimately differ.  What must not
    differ: the summed sums over all rows (X^T X, X^T R, R^T R, n) of every
    block whose input is the same in both runs (all earlier decisions agree),
    and hence the final refit of blocks kept in both runs.
    """
    runs = []
    for bs in (1, 2):
        batches = list(det_case.loader(4, bs))
        assert len(batches) == 4 // bs
        record_fits.clear()
        model, report = det_case.convert(batches=batches)
        runs.append((model, report, list(record_fits)))
    (m1, r1, f1), (m2, r2, f2) = runs
    compared_w = 0
    for i, (b1, b2) in enumerate(zip(r1.blocks, r2.blocks)):
        (s1, fit1), (s2, fit2) = f1[i], f2[i]
        assert s1.n == s2.n == b1.rows == b2.rows
        for t1, t2 in ((s1.xx, s2.xx), (s1.xr, s2.xr), (s1.rr, s2.rr)):
            torch.testing.assert_close(t1, t2, rtol=1e-5,
                                       atol=1e-6 * float(t1.abs().max()))
        if b1.kept and b2.kept:
            q1 = m1.model.get_submodule(b1.name).qwt
            q2 = m2.model.get_submodule(b2.name).qwt
            torch.testing.assert_close(q1.weight, q2.weight, rtol=1e-4,
                                       atol=1e-5)
            torch.testing.assert_close(q1.bias, q2.bias, rtol=1e-4, atol=1e-5)
            compared_w += 1
        if b1.kept != b2.kept:
            break  # later block inputs differ legitimately
    assert compared_w >= 1


@pytest.mark.parametrize('case,lam', [('cls', 10.0), ('det', 1e-2)])
def test_block_input_cache_changes_nothing_but_the_forwards(request, case,
                                                            lam, tmp_path):
    """Block inputs chained from the previous block (the default) against
    prefix forwards for every block (cache_bytes=0): the same W4A4 model,
    bit for bit, with fewer forwards."""
    data = request.getfixturevalue(f'{case}_case')
    names = [n for n, _ in transformer_blocks(data.model.model)]
    # off, ample, and a budget smaller than any batch (nothing kept)
    # the first block's inputs over all batches: a budget that holds the
    # inputs but no block output (outputs are then recomputed, 'chained')
    from gplq_mm.ptq.weight_ptq import _nbytes
    sizes = []
    hook = transformer_blocks(data.model.model)[0][1] \
        .register_forward_pre_hook(
            lambda mod, args, kwargs: sizes.append(_nbytes((args, kwargs))),
            with_kwargs=True)
    with torch.no_grad():
        for b in data.batches:
            data.backbone_runner(data.model)(b)
    hook.remove()
    # off, ample, inputs only, and a budget smaller than any batch
    runs = {budget: data.convert(lam=lam, cache_bytes=budget)
            for budget in (0, 2**30, sum(sizes), 1)}
    (m0, r0), (m1, r1), (mt, rt) = runs[0], runs[2**30], runs[1]
    mi, ri = runs[sum(sizes)]
    # what does not fit goes to a spill directory: nothing in memory, or
    # the inputs in memory and the outputs on disk
    spill = tmp_path / 'spill'
    spill.mkdir()
    ms, rs = data.convert(lam=lam, cache_bytes=0, spill_dir=str(spill))
    mo, ro = data.convert(lam=lam, cache_bytes=sum(sizes),
                          spill_dir=str(spill))
    assert list(spill.iterdir()) == []  # removed at the end
    for m, r in ((m1, r1), (mt, rt), (mi, ri), (ms, rs), (mo, ro)):
        sd0, sd = m0.state_dict(), m.state_dict()
        assert sd0.keys() == sd.keys()
        for k in sd0:
            assert torch.equal(sd0[k], sd[k]), k
        assert [(b.name, b.kept, b.r2) for b in r0.blocks] == \
            [(b.name, b.kept, b.r2) for b in r.blocks]
    nb, nblocks = len(data.batches), len(names)
    # without the cache: a prefix forward per batch and block
    assert r0.forwards == dict(prefix=nb * nblocks, block=2 * nb * nblocks,
                               chained=0)
    assert rt.forwards == r0.forwards  # budget too small: the same
    # with it: prefixes only where a block list starts (and batch 0 of every
    # chained block, the check); the next block's inputs are the kept
    # outputs plus QwT, no block runs again
    starts = sum(1 for i, n in enumerate(names)
                 if i == 0 or _chain_glue(data.model.model, names[i - 1], n)
                 is None)
    # one chain through all blocks: ViT layers, and Swin stages joined by
    # their patch merging (the batch-0 checks passed, or prefix would grow)
    assert starts == 1
    chained = nblocks - starts
    assert r1.forwards == dict(prefix=nb * starts + chained,
                               block=2 * nb * nblocks, chained=0)
    assert r1.forwards['prefix'] < r0.forwards['prefix']
    # spilled: the forwards of the ample budget
    assert rs.forwards == r1.forwards and ro.forwards == r1.forwards
    if case == 'cls':  # one block list of equal widths: room for the inputs
        # only, so every chained input is a forward of the finished block
        assert ri.forwards == dict(prefix=nb * starts + chained,
                                   block=2 * nb * nblocks,
                                   chained=nb * chained)


def _swin(lib):
    if lib == 'mmdet':
        from mmdet.models.backbones import SwinTransformer
        bb = SwinTransformer(embed_dims=16, depths=(2, 2), num_heads=(1, 2),
                             strides=(4, 2), out_indices=(0, 1),
                             pretrain_img_size=56)
    else:
        from mmpretrain.models.backbones import SwinTransformer
        bb = SwinTransformer(arch=dict(embed_dims=16, depths=[2, 2],
                                       num_heads=[1, 2]),
                             img_size=56, out_indices=(0, 1))
    bb.eval()  # (mmdet's Swin.train returns None)
    model = nn.Module()
    model.backbone = bb
    return model


@pytest.mark.parametrize('lib', ['mmdet', 'mmpretrain'])
def test_chain_glue_is_what_swin_does_between_stages(lib):
    """The rule that chains QwT block inputs across Swin stages (the stage's
    patch merging of the last block's output) reproduces the installed
    mmdet/mmpretrain forward exactly; no rule where blocks do not follow."""
    torch.manual_seed(0)
    model = _swin(lib)
    names = [n for n, _ in transformer_blocks(model)]
    assert names == [f'backbone.stages.{i}.blocks.{j}'
                     for i in range(2) for j in range(2)]
    io = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, kw, out, n=n: io.__setitem__(n, (a, kw, out)),
        with_kwargs=True) for n in names]
    with torch.no_grad():
        model.backbone(torch.randn(2, 3, 56, 56))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for a, b in zip(names, names[1:]):
            glue = _chain_glue(model, a, b)
            assert glue is not None, (a, b)
            args, kwargs = glue(io[a][2], io[a][0], io[a][1])
            assert torch.equal(args[0], io[b][0][0]), (a, b)
            assert tuple(args[1]) == tuple(io[b][0][1]) and \
                kwargs == io[b][1]
    # not the next block: no rule
    assert _chain_glue(model, names[0], names[2]) is None
    assert _chain_glue(model, names[0], names[3]) is None


def test_chain_mismatch_falls_back_to_prefixes(cls_case):
    """A model that does more between two blocks than passing the output on
    (here: a hook that scales block 1's input) is detected on batch 0 and
    handled by prefix forwards; the result equals the no-cache run."""
    logs = []

    def convert(cache_bytes):
        from gplq_mm.ptq.weight_ptq import weight_ptq
        from gplq_mm.quant import WeightQuantConfig
        model = copy.deepcopy(cls_case.model)
        blk = model.model.backbone.layers[1]
        blk.register_forward_pre_hook(
            lambda mod, args: (args[0] * 1.5, ) + tuple(args[1:]))
        report = weight_ptq(model.model, lambda: cls_case.batches,
                            cls_case.backbone_runner(model),
                            WeightQuantConfig(), lam=10.0,
                            cache_bytes=cache_bytes, logger=logs.append)
        return model, report

    ref, _ = convert(0)
    got, rep = convert(2**30)
    assert any('differs from the model' in m for m in logs)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    # block 0 -> 1 was tried (the log above), then every input came from a
    # prefix forward, as without the cache
    nblocks = len(transformer_blocks(got.model))
    assert rep.forwards['prefix'] == len(cls_case.batches) * nblocks
    assert rep.forwards['chained'] == 0


def test_spill_directory_is_removed_on_error(cls_case, tmp_path):
    """Spilled block inputs do not outlive a failed fit."""
    spill = tmp_path / 'spill'
    spill.mkdir()
    with pytest.raises(ValueError, match='batch_ids has'):
        # one batch id too many: raised after the first block's batches
        cls_case.convert(lam=10.0, cache_bytes=0, spill_dir=str(spill),
                         batch_ids=list(range(len(cls_case.batches) + 1)))
    assert list(spill.iterdir()) == []


# --------------------------------------------------------------------------
# GPTQ rounding (WeightQuantConfig.rounding='gptq')
# --------------------------------------------------------------------------
def _convert_with(case, w_cfg, full: bool):
    """(converted copy, log lines): weight_ptq without QwT; GPTQ's Hessians
    from a forward of the whole model (``full``) or of nothing."""
    from gplq_mm.ptq.weight_ptq import weight_ptq
    model = copy.deepcopy(case.model)

    def run_all(batch):
        data = model.data_preprocessor(batch, False)
        model(**data, mode='tensor')

    logs = []
    weight_ptq(model.model, lambda: case.batches, case.backbone_runner(model),
               w_cfg, qwt=False, logger=logs.append,
               full_run=run_all if full else (lambda batch: None))
    return model, logs


@pytest.mark.parametrize('case_name', CASES)
def test_gptq_rounding_same_grid_other_codes(request, case_name):
    """rounding='gptq': every Linear that the full forward reaches (the
    classifier head and the RoI head's FCs too) gets GPTQ codes on the grid
    nearest rounding uses; Conv2d layers round to nearest, as logged; with no
    calibration input the rounding is nearest everywhere, as logged."""
    case = request.getfixturevalue(f'{case_name}_case')
    near, _ = _convert_with(case, WeightQuantConfig(), True)
    gptq, logs = _convert_with(case, WeightQuantConfig(rounding='gptq'), True)
    blind, blind_logs = _convert_with(case, WeightQuantConfig(
        rounding='gptq'), False)
    n_int, g_int = integer_layers(near.model), integer_layers(gptq.model)
    assert sorted(n_int) == sorted(g_int)
    linear = [n for n, m in n_int.items() if isinstance(m, IntQLinear)]
    differ = []
    for name, a in n_int.items():
        b = g_int[name]
        assert torch.equal(a.weight_scale, b.weight_scale), name
        if isinstance(a, IntQConv2d):
            assert torch.equal(a.weight_packed, b.weight_packed), name
        elif not torch.equal(a.weight_packed, b.weight_packed):
            differ.append(name)
    heads = [n for n in linear if n.startswith(('head', 'roi_head'))]
    assert heads and set(heads) <= set(differ), (heads, differ)
    assert len(differ) >= 0.8 * len(linear), (differ, linear)
    assert any(f'GPTQ: input Gram matrices of {len(linear)} Linear layers' in m
               for m in logs), logs
    if len(linear) < len(n_int):  # the detector's convolutions
        assert any('layers round to nearest (Conv2d' in m for m in logs), logs
    for name, m in integer_layers(blind.model).items():
        assert torch.equal(m.weight_packed, n_int[name].weight_packed), name
    assert any('GPTQ: no calibration input reached' in m for m in blind_logs)
