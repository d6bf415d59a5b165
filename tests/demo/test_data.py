"""The demo datasets (gplq_mm.demo.data) and the tiny FP32 demo configs.

Small counts throughout: the whole module runs in seconds on a CPU.
"""
import json
import os
import os.path as osp

import numpy as np
import pytest

from gplq_mm.demo import data

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DET_CFG = osp.join(REPO, 'configs', 'demo', 'mask-rcnn_swin-tiny_fpn_shapes.py')
CLS_CFGS = [
    osp.join(REPO, 'configs', 'demo', 'deit-tiny_fashionmnist.py'),
    osp.join(REPO, 'configs', 'demo', 'swin-tiny_fashionmnist.py'),
]


def _tree_bytes(root):
    """{relative path: bytes} of every file below root except the manifest."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = osp.join(d, f)
            rel = osp.relpath(p, root)
            if rel != 'manifest.json':
                with open(p, 'rb') as fh:
                    out[rel] = fh.read()
    return out


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    return data.make_shapes_coco(str(root), num_train=8, num_val=4,
                                 img_size=128, seed=0)


@pytest.fixture(scope='module')
def cls_generated(tmp_path_factory):
    root = tmp_path_factory.mktemp('cls_gen')
    return data.make_classification(str(root), num_train=20, num_val=10,
                                    seed=0, source='generated')


# --------------------------------------------------------------- shapes
def test_shapes_deterministic(tmp_path, shapes):
    again = data.make_shapes_coco(str(tmp_path / 'again'), num_train=8,
                                  num_val=4, img_size=128, seed=0)
    a, b = _tree_bytes(shapes['root']), _tree_bytes(again['root'])
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith('.png')]) == 12
    for k in a:
        assert a[k] == b[k], f'{k} differs between two runs with seed 0'
    other = data.make_shapes_coco(str(tmp_path / 'other'), num_train=8,
                                  num_val=4, img_size=128, seed=1)
    assert _tree_bytes(other['root'])['train/000000.png'] != a[
        'train/000000.png']


def test_shapes_manifest_skip_and_regenerate(tmp_path):
    root = str(tmp_path / 's')
    r1 = data.make_shapes_coco(root, num_train=2, num_val=1, img_size=64)
    assert r1['generated']
    m = json.load(open(osp.join(root, 'manifest.json')))
    assert m['status'] == 'complete' and m['seed'] == 0
    assert (m['num_train'], m['num_val'], m['img_size']) == (2, 1, 64)
    assert m['version'] == data.SHAPES_VERSION
    mtime = os.path.getmtime(r1['train_ann'])
    r2 = data.make_shapes_coco(root, num_train=2, num_val=1, img_size=64)
    assert not r2['generated']
    assert os.path.getmtime(r1['train_ann']) == mtime
    assert r2['num_train_instances'] == r1['num_train_instances']
    # other counts: regenerated, and no stale images left behind
    r3 = data.make_shapes_coco(root, num_train=1, num_val=1, img_size=64)
    assert r3['generated']
    assert sorted(os.listdir(osp.join(root, 'train'))) == ['000000.png']


def test_shapes_refuses_foreign_folders(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'precious.png').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='force'):
        data.make_shapes_coco(str(tmp_path), num_train=1, num_val=1,
                              img_size=64)
    assert (tmp_path / 'train' / 'precious.png').exists()


def test_shapes_valid_coco(shapes):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    size = 128
    for split, n in (('train', 8), ('val', 4)):
        coco = COCO(shapes[f'{split}_ann'])
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(
            data.SHAPES_CLASSES)
        assert len(coco.getImgIds()) == n
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            assert (info['height'], info['width']) == (size, size)
            assert osp.isfile(
                osp.join(shapes['root'], split, info['file_name']))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert len(anns) >= 1
            for ann in anns:
                assert ann['iscrowd'] == 0
                assert ann['category_id'] in coco.getCatIds()
                m = coco.annToMask(ann)
                assert m.shape == (size, size)
                assert ann['area'] == int(m.sum()) > 0
                x, y, w, h = ann['bbox']
                assert w > 0 and h > 0
                assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
                ys, xs = np.nonzero(m)
                assert [x, y, w, h] == [
                    xs.min(), ys.min(), xs.max() - xs.min() + 1,
                    ys.max() - ys.min() + 1
                ]
                rle = dict(ann['segmentation'])
                rle['counts'] = rle['counts'].encode()
                assert (mask_utils.decode(rle) == m).all()


# ------------------------------------------------------- classification
def test_cls_generated_deterministic_and_layout(tmp_path, cls_generated):
    r = cls_generated
    assert r['source'] == 'generated'
    assert r['classes'] == data.GENERATED_CLS_CLASSES
    assert sorted(os.listdir(r['train_dir'])) == list(r['folders'])
    assert all(len(os.listdir(osp.join(r['train_dir'], f))) == 2
               for f in r['folders'])
    again = data.make_classification(str(tmp_path / 'again'), num_train=20,
                                     num_val=10, seed=0, source='generated')
    assert _tree_bytes(r['root']) == _tree_bytes(again['root'])
    assert not data.make_classification(
        r['root'], num_train=20, num_val=10, seed=0,
        source='generated')['generated']


def test_cls_missing_fashion_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
        data.make_classification(str(tmp_path), 10, 10,
                                 source='fashion-mnist',
                                 fashion_mnist_dir=str(tmp_path / 'nope'))
    r = data.make_classification(str(tmp_path / 'auto'), 10, 10,
                                 source='auto',
                                 fashion_mnist_dir=str(tmp_path / 'nope'))
    assert r['source'] == 'generated'


@pytest.mark.skipif(not data.fashion_mnist_available(),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_cls_fashion_mnist(tmp_path):
    from PIL import Image
    r = data.make_classification(str(tmp_path / 'a'), 30, 20, seed=0)
    assert r['source'] == 'fashion-mnist'
    assert r['classes'] == data.FASHION_MNIST_CLASSES
    im = Image.open(
        osp.join(r['train_dir'], r['folders'][0],
                 os.listdir(osp.join(r['train_dir'], r['folders'][0]))[0]))
    assert im.size == (28, 28) and im.mode == 'L'
    again = data.make_classification(str(tmp_path / 'b'), 30, 20, seed=0)
    assert _tree_bytes(r['root']) == _tree_bytes(again['root'])


@pytest.mark.skipif(not data.fashion_mnist_available(),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_cls_holdout_is_carved_from_train_and_disjoint(tmp_path):
    """holdout_after=N: ``val`` holds Fashion-MNIST *training* images that no
    training draw of up to N images (same seed) contains."""
    import numpy as np
    from PIL import Image

    def images(root, split):
        out = set()
        for dirpath, _, files in os.walk(osp.join(root, split)):
            for f in files:
                arr = np.asarray(Image.open(osp.join(dirpath, f)))
                out.add((osp.basename(dirpath), arr.tobytes()))
        return out

    big = data.make_classification(str(tmp_path / 'big'), 60, 10, seed=3)
    small = data.make_classification(str(tmp_path / 'small'), 20, 10, seed=3)
    tune = data.make_classification(str(tmp_path / 'tune'), 20, 30, seed=3,
                                    holdout_after=60)
    assert tune['manifest']['holdout_after'] == 60
    # training draws are nested prefixes: the tuning train split is `small`'s
    assert images(tune['root'], 'train') == images(small['root'], 'train')
    assert images(small['root'], 'train') <= images(big['root'], 'train')
    val = images(tune['root'], 'val')
    assert len(val) == 30
    assert not val & images(big['root'], 'train')  # disjoint from training
    assert not val & images(big['root'], 'val')  # not the test split either
    with pytest.raises(ValueError, match='holdout_after'):
        data.make_classification(str(tmp_path / 'bad'), 20, 10, seed=3,
                                 holdout_after=10)  # < num_train
    with pytest.raises(ValueError, match='holdout_after'):
        data.make_classification(str(tmp_path / 'gen'), 20, 10,
                                 source='generated', holdout_after=60)


def test_cls_read_by_custom_dataset(cls_generated):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for split, n in (('train', 20), ('val', 10)):
            ds = DATASETS.build(
                dict(type='CustomDataset', data_root=cls_generated['root'],
                     data_prefix=split, pipeline=[]))
            assert len(ds) == n
            assert ds.metainfo['classes'] == cls_generated['folders']
            labels = [ds.get_data_info(i)['gt_label'] for i in range(n)]
            assert sorted(set(int(x) for x in labels)) == list(range(10))
            # the class index is the label prefix of the folder name
            for i in range(n):
                info = ds.get_data_info(i)
                folder = osp.basename(osp.dirname(info['img_path']))
                assert int(folder[:2]) == int(info['gt_label'])


# -------------------------------------------------------------- configs
def test_det_config_builds(shapes, monkeypatch):
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)

    root = shapes['root'] + '/'
    monkeypatch.setenv('GPLQ_DEMO_SHAPES', root)
    cfg = Config.fromfile(DET_CFG)
    assert cfg.train_dataloader.dataset.data_root == root
    assert cfg.val_evaluator.ann_file == shapes['val_ann']
    assert tuple(cfg.classes) == data.SHAPES_CLASSES
    assert cfg.model.backbone.init_cfg is None and cfg.load_from is None
    assert cfg.model.roi_head.bbox_head.num_classes == len(data.SHAPES_CLASSES)

    # the documented --cfg-options keys point it at another directory
    monkeypatch.delenv('GPLQ_DEMO_SHAPES')
    cfg2 = Config.fromfile(DET_CFG)
    assert cfg2.data_root == 'data/demo/shapes/'
    cfg2.merge_from_dict({
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root,
        'val_evaluator.ann_file': shapes['val_ann'],
    })
    with DefaultScope.overwrite_default_scope('mmdet'):
        for c, n in ((cfg.train_dataloader, 8), (cfg.val_dataloader, 4),
                     (cfg2.train_dataloader, 8), (cfg2.val_dataloader, 4)):
            ds = DATASETS.build(c.dataset)
            assert len(ds) == n
            assert ds.metainfo['classes'] == data.SHAPES_CLASSES
        ds = DATASETS.build(cfg.train_dataloader.dataset)
        sample = ds[0]
        assert tuple(sample['inputs'].shape) == (3, 128, 128)
        gt = sample['data_samples'].gt_instances
        assert len(gt) >= 1 and gt.masks.masks.shape[1:] == (128, 128)

        model = MODELS.build(cfg.model)
        model.init_weights()
        batch = model.data_preprocessor(
            dict(inputs=[ds[i]['inputs'] for i in range(2)],
                 data_samples=[ds[i]['data_samples'] for i in range(2)]),
            True)
        losses = model.loss(batch['inputs'], batch['data_samples'])
        loss, _ = model.parse_losses(losses)
        assert torch.isfinite(loss)


@pytest.mark.parametrize('cfg_path', CLS_CFGS,
                         ids=[osp.basename(p) for p in CLS_CFGS])
def test_cls_config_builds(cfg_path, cls_generated, monkeypatch):
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS, MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)

    root = cls_generated['root'] + '/'
    monkeypatch.setenv('GPLQ_DEMO_CLS', root)
    cfg = Config.fromfile(cfg_path)
    assert cfg.train_dataloader.dataset.data_root == root
    assert cfg.model.head.num_classes == 10
    assert cfg.model.train_cfg in (None, {})  # no Mixup / CutMix
    monkeypatch.delenv('GPLQ_DEMO_CLS')
    cfg2 = Config.fromfile(cfg_path)
    cfg2.merge_from_dict({
        'train_dataloader.dataset.data_root': root,
        'val_dataloader.dataset.data_root': root
    })
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        for c, n in ((cfg.train_dataloader, 20), (cfg.val_dataloader, 10),
                     (cfg2.train_dataloader, 20), (cfg2.val_dataloader, 10)):
            ds = DATASETS.build(c.dataset)
            assert len(ds) == n
            assert len(ds.metainfo['classes']) == 10
        ds = DATASETS.build(cfg.train_dataloader.dataset)
        model = MODELS.build(cfg.model)
        model.init_weights()
        batch = model.data_preprocessor(
            dict(inputs=[ds[i]['inputs'] for i in range(4)],
                 data_samples=[ds[i]['data_samples'] for i in range(4)]),
            True)
        assert batch['inputs'].shape[-1] == cfg.model.backbone.img_size
        losses = model.loss(batch['inputs'], batch['data_samples'])
        assert torch.isfinite(losses['loss'])
