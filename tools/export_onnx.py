"""Export a W4A4 model (the output of tools/gplq_quantize.py) to ONNX.

    python tools/export_onnx.py work_dirs/x/<name>_w4a4.py \
        work_dirs/x/<name>_w4a4.pth --out work_dirs/x/<name>_w4a4.onnx [--check]

Opset 21: weights as INT4 initializers, activations as INT4
QuantizeLinear/DequantizeLinear, the log-sqrt2 softmax quantizer as
elementwise ops, QwT as MatMul + Add.  Classifiers export whole (logits);
detectors export backbone + neck (the heads stay in PyTorch).  The input is
the tensor after the model's data_preprocessor; shapes are static (the
first --batch-size test images, or --shape H W).  --check runs the file in
onnxruntime and compares every quantized tensor's integer codes and the
outputs with the PyTorch integer model.  See docs/deployment.md.

The work is done by gplq_mm.deploy.model_export.export_checkpoint.
"""
import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='W4A4 config written by gplq_quantize.py')
    p.add_argument('checkpoint', help='W4A4 checkpoint written with it')
    p.add_argument('--out', required=True, help='the .onnx file to write '
                   '(a .json report is written beside it)')
    p.add_argument('--check', action='store_true', help='compare with the '
                   'PyTorch integer model in onnxruntime (CPU)')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='export on a random input of this size instead of '
                   'test images')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='allow unsafe unpickling of CHECKPOINT')
    p.add_argument('--cfg-options', nargs='+', action=_DictAction, default={},
                   help='override config settings, as in tools/test.py')
    return p.parse_args(argv)


def _DictAction(*args, **kwargs):
    from mmengine.config import DictAction
    return DictAction(*args, **kwargs)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        sys.exit('error: --batch-size must be at least 1')
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        sys.exit(f'error: {e}. Install the export extra: pip install -e '
                 '".[deploy]" (pins onnx and onnxruntime that keep numpy 1.x).')
    from gplq_mm.deploy.model_export import export_checkpoint
    from gplq_mm.deploy.onnx_export import ExportError
    try:
        export_checkpoint(args.config, args.checkpoint, args.out,
                          batch_size=args.batch_size, shape=args.shape,
                          check=args.check, trust=args.trust_checkpoint,
                          cfg_options=args.cfg_options)
    except ExportError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
