"""Downstream probe sets: regenerated at other sizes, nothing of the old set
stays behind; foreign folders are not deleted."""
import os

import pytest

from gplq_mm.demo.probe import make_downstream


def _count(root):
    return {split: sum(len(files) for _, _, files in
                       os.walk(os.path.join(root, split)))
            for split in ('train', 'val')}


def test_regenerated_at_other_sizes_leaves_no_stale_images(tmp_path):
    root = str(tmp_path / 'downstream')
    sets = make_downstream(root, num_train=60, num_test=20)
    assert _count(sets['digits']) == dict(train=60, val=20)
    # smaller: the files of the larger set (indexed over the whole split,
    # so in other classes' folders) must not stay behind
    sets = make_downstream(root, num_train=50, num_test=10)
    for name in ('digits', 'shapes'):
        assert _count(sets[name]) == dict(train=50, val=10), name
    before = os.path.getmtime(os.path.join(sets['digits'], 'manifest.json'))
    make_downstream(root, num_train=50, num_test=10)  # cached: not rewritten
    assert os.path.getmtime(
        os.path.join(sets['digits'], 'manifest.json')) == before


def test_foreign_digits_folder_is_not_deleted(tmp_path):
    digits = tmp_path / 'downstream' / 'digits' / 'train'
    digits.mkdir(parents=True)
    (digits / 'mine.png').write_bytes(b'x')
    with pytest.raises(FileExistsError, match='not written by'):
        make_downstream(str(tmp_path / 'downstream'), 50, 10)
    assert (digits / 'mine.png').exists()
