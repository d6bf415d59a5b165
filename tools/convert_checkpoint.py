"""Rewrite a trusted checkpoint so it loads with torch.load(weights_only=True).

torch >= 2.6 refuses checkpoints written by mmengine's CheckpointHook (they
hold HistoryBuffer/numpy objects).  This tool unpickles SRC *unsafely* - only
do that for files you trust - and writes DST with tensors and plain Python
values only (the same conversion GPLQSafeCheckpointHook applies while
training).  By default only ``state_dict`` and ``meta`` are kept, which is
all that ``load_from`` and the stock test scripts read.

    python tools/convert_checkpoint.py SRC.pth DST.pth --trust [--keep-all]
"""
import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='checkpoint to convert')
    p.add_argument('dst', help='output path (written atomically)')
    p.add_argument('--trust', action='store_true',
                   help='required: confirm SRC comes from a trusted source; it is '
                   'unpickled with weights_only=False')
    p.add_argument('--keep-all', action='store_true',
                   help='also keep optimizer, message_hub, param_schedulers '
                   '(for --resume)')
    args = p.parse_args(argv)
    if not args.trust:
        p.error('unpickling SRC can run arbitrary code: pass --trust if you '
                'trust where it came from.')
    from gplq_mm.engine.safe_checkpoint import load_checkpoint_file, to_safe
    ckpt = load_checkpoint_file(args.src, trust=True)
    if not isinstance(ckpt, dict):
        sys.exit(f'{args.src} is not a checkpoint dict')
    if 'state_dict' not in ckpt:  # a bare state dict
        ckpt = {'state_dict': ckpt}
    keep = ckpt if args.keep_all else {
        k: v for k, v in ckpt.items() if k in ('state_dict', 'meta')}
    safe = to_safe(keep)
    tmp = args.dst + '.tmp'
    torch.save(safe, tmp)
    torch.load(tmp, map_location='cpu', weights_only=True)  # verify
    os.replace(tmp, args.dst)
    print(f'wrote {args.dst} ({os.path.getsize(args.dst) / 2**20:.1f} MiB, '
          f'keys: {sorted(safe)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
