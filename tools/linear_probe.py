"""Linear-probe generalization of a classifier's frozen backbone features.

    python tools/linear_probe.py CONFIG CHECKPOINT [--data-root DIR] [--out JSON]

CONFIG/CHECKPOINT: any classifier the stock test.py evaluates (FP32, GPLQ
W32A4, a W4A4 config written by gplq_quantize.py).  The downstream sets
(scikit-learn digits and the project's generated shapes classes, which no
stage trains on) are written to --data-root once; the backbone features are
extracted through the config's test pipeline and a logistic regression is
fitted per set (C chosen on a split of the downstream train data).  Prints
one line per set and the average, and writes them as JSON with --out.
"""
import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--data-root', default='data/downstream')
    p.add_argument('--num-train', type=int, default=500)
    p.add_argument('--num-test', type=int, default=300)
    p.add_argument('--out', default=None, help='write the results as JSON')
    args = p.parse_args(argv)
    for path in (args.config, args.checkpoint):
        if not os.path.isfile(path):
            p.error(f'{path}: no such file')
    from gplq_mm.demo.probe import make_downstream, probe
    try:
        sets = make_downstream(args.data_root, args.num_train, args.num_test)
    except ValueError as e:
        p.error(str(e).replace('num_train=', '--num-train ')
                .replace('num_test=', '--num-test '))
    res = probe(args.config, args.checkpoint, sets,
                log=lambda m: print(f'[linear_probe] {m}', flush=True))
    print(f'[linear_probe] average: {res["average"]:.2f}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
