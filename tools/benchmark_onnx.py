"""onnxruntime latency of a W4A4 export against the FP32 export of the same
model, measured side by side in one process (docs/deployment.md).

    python tools/benchmark_onnx.py W4A4_CONFIG W4A4_CKPT FP32_CONFIG \
        FP32_CKPT --work-dir work_dirs/onnx_bench [--batch-size 1] \
        [--repeats 20] [--agree-batches 10]

Both models are exported on the same input (the first test images through
the W4A4 model's data preprocessor) and timed alternately, one thread each:

  fp32        the FP32 export, all graph optimizations
  w4a4        the W4A4 export, all optimizations; DequantizeLinear(INT4) ->
              MatMul fused into MatMulNBits at accuracy level 0 (float32:
              the same codes as the PyTorch integer path)
  w4a4_int8   the same file, MatMulNBits at accuracy level 4 (activations
              requantized to int8 inside the kernel: faster, not our model)
  w4a4_basic  the W4A4 export with basic optimizations only (no fusion)

and, over --agree-batches test batches, how often onnxruntime (w4a4) and
the PyTorch integer model agree (classifier: top-1 and accuracy; detector:
features' max relative difference), next to how often PyTorch agrees with
itself when every quantized tensor's input gets --noise-ulps random ulps
(the size of the differences between two float implementations of
LayerNorm, GELU or softmax, which a 4-bit grid turns into code flips).  Writes benchmark_onnx.json in --work-dir.
"""
import argparse
import json
import os
import os.path as osp
import platform
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for n in ('w4a4_config', 'w4a4_checkpoint', 'fp32_config',
              'fp32_checkpoint'):
        p.add_argument(n)
    p.add_argument('--work-dir', required=True)
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'))
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--agree-batches', type=int, default=10)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--noise-ulps', type=float, default=4.0,
                   help='the float-noise yardstick (see float_noise)')
    return p.parse_args(argv)


class float_noise:
    """Context: every integer layer's and activation quantizer's input is
    multiplied by ``1 + ulps * 2^-23 * N(0, 1)`` (seeded): what another
    float implementation of the ops between quantizers does to them."""

    def __init__(self, model, ulps: float, seed: int = 0):
        from gplq_mm.quant import IntQConv2d, IntQLinear, iter_act_quantizers
        self.targets = [m for m in model.modules()
                        if isinstance(m, (IntQLinear, IntQConv2d))]
        self.targets += [q for _, q in iter_act_quantizers(model)]
        self.ulps, self.seed, self.hooks = ulps, seed, []

    def _pre(self, mod, args):
        import torch
        x = args[0]
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return (x * (1 + self.ulps * 2.0**-23 * noise.to(x.device)), ) + \
            tuple(args[1:])

    def __enter__(self):
        import torch
        self.gen = getattr(self, 'gen', None) or \
            torch.Generator().manual_seed(self.seed)
        self.hooks = [m.register_forward_pre_hook(self._pre)
                      for m in self.targets]

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from gplq_mm.deploy.model_export import (deploy_part, example_batch,
                                             load_model, test_loader)
    from gplq_mm.deploy.onnx_export import export_onnx, ort_session
    os.makedirs(args.work_dir, exist_ok=True)
    cfg, w4 = load_model(args.w4a4_config, args.w4a4_checkpoint)
    _, fp = load_model(args.fp32_config, args.fp32_checkpoint)
    x = example_batch(cfg, w4, args.batch_size, args.shape)
    files, info = {}, {}
    for tag, model, req in (('w4a4', w4, True), ('fp32', fp, False)):
        mod, names, what = deploy_part(model, x)
        files[tag] = osp.join(args.work_dir, f'{tag}.onnx')
        i = export_onnx(mod, x, files[tag], output_names=names,
                        require_w4a4=req)
        info[tag] = dict(bytes=i.bytes, int4_params=i.int4_params,
                         float_params=i.float_params, int4_share=i.int4_share)
    part = what
    sessions = dict(
        fp32=ort_session(files['fp32'], args.threads, 'all'),
        w4a4=ort_session(files['w4a4'], args.threads, 'all'),
        w4a4_int8=ort_session(files['w4a4'], args.threads, 'all',
                              nbits_accuracy=4),
        w4a4_basic=ort_session(files['w4a4'], args.threads, 'basic'))
    feed = {'inputs': x.numpy()}
    for s in sessions.values():  # warm up
        s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(args.repeats):  # alternate: same machine state for all
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = {k: dict(median_ms=1e3 * v, vs_fp32=v / med['fp32'])
            for k, v in med.items()}

    # agreement of onnxruntime (w4a4, all) with the PyTorch integer model
    # and, as the yardstick of float noise, PyTorch against itself with
    # every quantized tensor's input moved by --noise-ulps random ulps
    agree = dict(batches=0, images=0, top1_same=0, max_rel=0.0,
                 noise_ulps=args.noise_ulps, noise_top1_same=0,
                 noise_max_rel=0.0, labelled=0, top1_correct_torch=0,
                 top1_correct_ort=0, top1_correct_noise=0)
    noisy = float_noise(w4, args.noise_ulps)
    if args.agree_batches > 0 and args.shape is None:
        mod, _, _ = deploy_part(w4)
        for b, batch in enumerate(test_loader(cfg, args.batch_size)):
            if b == args.agree_batches:
                break
            with torch.no_grad():
                xb = w4.data_preprocessor(batch, False)['inputs'].float()
                if tuple(xb.shape) != tuple(x.shape):
                    continue  # static shapes: other sizes do not fit
                ref = mod(xb)
                with noisy:
                    ulp = mod(xb)
            got = sessions['w4a4'].run(None, {'inputs': xb.numpy()})
            refs = ref if isinstance(ref, (tuple, list)) else [ref]
            ulps = ulp if isinstance(ulp, (tuple, list)) else [ulp]
            for r, g, u in zip(refs, got, ulps):
                r, u = r.numpy(), u.numpy()
                den = max(np.abs(r).max(), 1e-12)
                agree['max_rel'] = max(agree['max_rel'],
                                       float(np.abs(r - g).max() / den))
                agree['noise_max_rel'] = max(agree['noise_max_rel'],
                                           float(np.abs(r - u).max() / den))
            if part == 'classifier':
                top = refs[0].numpy().argmax(-1)
                agree['top1_same'] += int((top == got[0].argmax(-1)).sum())
                agree['noise_top1_same'] += int(
                    (top == ulps[0].numpy().argmax(-1)).sum())
                labels = [getattr(d, 'gt_label', None)
                          for d in batch.get('data_samples', [])]
                if labels and all(lb is not None for lb in labels):
                    lab = np.array([int(lb) for lb in labels])
                    agree['labelled'] += len(lab)
                    agree['top1_correct_torch'] += int((top == lab).sum())
                    agree['top1_correct_ort'] += int(
                        (got[0].argmax(-1) == lab).sum())
                    agree['top1_correct_noise'] += int(
                        (ulps[0].numpy().argmax(-1) == lab).sum())
            agree['batches'] += 1
            agree['images'] += xb.shape[0]
    out = dict(part=part, input_shape=list(x.shape), threads=args.threads,
               repeats=args.repeats, files=info, latency=rows,
               agreement=agree, machine=platform.processor() or
               platform.machine(), date=time.strftime('%Y-%m-%d %H:%M'))
    with open(osp.join(args.work_dir, 'benchmark_onnx.json'), 'w') as f:
        json.dump(out, f, indent=1)
    print(f'{part}, input {tuple(x.shape)}, {args.threads} thread(s), '
          f'median of {args.repeats}')
    for tag in ('fp32', 'w4a4'):
        i = info[tag]
        print(f'  {tag:5s} file {i["bytes"] / 2**20:7.2f} MiB  INT4 weights '
              f'{100 * i["int4_share"]:5.1f}%')
    for k, r in rows.items():
        print(f'  {k:10s} {r["median_ms"]:9.2f} ms  {r["vs_fp32"]:.2f}x FP32')
    if agree['batches']:
        a, n = agree, agree['images']
        cls = part == 'classifier'
        print(f'  over {n} test images: onnxruntime vs PyTorch integer model '
              f'max rel diff {a["max_rel"]:.2e}' +
              (f', top-1 same {a["top1_same"]}/{n}' if cls else ''))
        print(f'  (PyTorch vs PyTorch with {args.noise_ulps} ulp(s) of '
              f'random noise on every quantized input: max rel diff '
              f'{a["noise_max_rel"]:.2e}' +
              (f', top-1 same {a["noise_top1_same"]}/{n})' if cls else ')'))
        if a['labelled']:
            m = a['labelled']
            print(f'  top-1 accuracy: PyTorch {a["top1_correct_torch"]}/{m}, '
                  f'onnxruntime {a["top1_correct_ort"]}/{m}, PyTorch with '
                  f'noise {a["top1_correct_noise"]}/{m}')


if __name__ == '__main__':
    main()
