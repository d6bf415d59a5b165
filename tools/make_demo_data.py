"""Write the demo / CI datasets (deterministic; reused when already up to date).

    python tools/make_demo_data.py                       # both, into data/demo/
    python tools/make_demo_data.py --what shapes --out /tmp/d --shapes-train 16 --shapes-val 8
    python tools/make_demo_data.py --what cls --cls-source generated

Layout (the defaults the configs in configs/demo/ read):

    <out>/shapes/{train,val}/*.png, <out>/shapes/annotations/instances_{train,val}.json
        COCO instance segmentation, 6 shape classes, 128 px
        (configs/demo/mask-rcnn_swin-tiny_fpn_shapes.py; env GPLQ_DEMO_SHAPES)
    <out>/cls/{train,val}/<NN_class>/*.png
        10-class folder-per-class set for mmpretrain's CustomDataset: real
        Fashion-MNIST (Debian package dataset-fashion-mnist) if installed, else
        generated textured shapes
        (configs/demo/{deit,swin}-tiny_fashionmnist.py; env GPLQ_DEMO_CLS)

Each folder gets a manifest.json; a rerun with the same arguments does nothing.
"""
import argparse
import os.path as osp
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

from gplq_mm.demo import data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='data/demo',
                   help='parent directory (default: data/demo)')
    p.add_argument('--what', choices=['shapes', 'cls', 'all'], default='all',
                   help='which dataset(s) to write (default: all)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--shapes-train', type=int, default=400,
                   help='shapes training images (default 400)')
    p.add_argument('--shapes-val', type=int, default=100,
                   help='shapes validation images (default 100)')
    p.add_argument('--img-size', type=int, default=128,
                   help='shapes image side in px (default 128)')
    p.add_argument('--cls-train', type=int, default=6000,
                   help='classification training images, split evenly over '
                   'the 10 classes (default 6000)')
    p.add_argument('--cls-val', type=int, default=1000,
                   help='classification validation images (default 1000)')
    p.add_argument('--cls-source', default='auto',
                   choices=['auto', 'fashion-mnist', 'generated'],
                   help="'auto' uses Fashion-MNIST when its files exist "
                   f'({data.FASHION_MNIST_DIR}), else generated images')
    p.add_argument('--fashion-mnist-dir', default=data.FASHION_MNIST_DIR,
                   help='where the Fashion-MNIST idx .gz files are')
    p.add_argument('--force', action='store_true',
                   help='regenerate even if an up-to-date manifest exists')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.what in ('shapes', 'all'):
        t0 = time.time()
        r = data.make_shapes_coco(
            osp.join(args.out, 'shapes'), num_train=args.shapes_train,
            num_val=args.shapes_val, img_size=args.img_size, seed=args.seed,
            force=args.force)
        print(f"shapes: {r['root']}  {r['num_train']} train "
              f"({r['num_train_instances']} instances) / {r['num_val']} val "
              f"({r['num_val_instances']} instances), classes "
              f"{', '.join(r['classes'])}; "
              f"{'written' if r['generated'] else 'up to date'} "
              f'({time.time() - t0:.1f}s)')
    if args.what in ('cls', 'all'):
        t0 = time.time()
        r = data.make_classification(
            osp.join(args.out, 'cls'), num_train=args.cls_train,
            num_val=args.cls_val, seed=args.seed, source=args.cls_source,
            fashion_mnist_dir=args.fashion_mnist_dir, force=args.force)
        note = '' if r['source'] == 'fashion-mnist' else (
            '  (Fashion-MNIST not found: `apt-get install '
            'dataset-fashion-mnist` for the real data)')
        print(f"cls: {r['root']}  source {r['source']}, {r['num_train']} "
              f"train / {r['num_val']} val, classes "
              f"{', '.join(r['classes'])}; "
              f"{'written' if r['generated'] else 'up to date'} "
              f'({time.time() - t0:.1f}s){note}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
