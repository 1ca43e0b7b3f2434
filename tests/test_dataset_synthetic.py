"""The built-in synthetic COCO-format dataset: determinism, COCO validity, content."""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from efficientvit_det.datasets import synthetic
from efficientvit_det.datasets.synthetic import (CLASSES, dataset_is_complete,
                                                 generate_dataset, make_config, render_image)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(osp.join(dirpath, f), 'rb') as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


@pytest.fixture(scope='module')
def normal_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('synth_normal'))
    generate_dataset(out, num_train=120, num_val=30, size=256, seed=3, verbose=False)
    return out


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    generate_dataset(a, 12, 4, size=96, seed=7, verbose=False)
    generate_dataset(b, 12, 4, size=96, seed=7, verbose=False)
    generate_dataset(c, 12, 4, size=96, seed=8, verbose=False)
    assert _digest(a) == _digest(b)  # bit-identical files
    assert _digest(a) != _digest(c)
    # an image depends only on (seed, split, index): a longer run starts with the same images
    img_small, anns_small = render_image(make_config(96), 7, 'train', 5)
    d = str(tmp_path / 'd')
    generate_dataset(d, 30, 0, size=96, seed=7, verbose=False)
    with open(osp.join(a, 'annotations', 'instances_train.json')) as f:
        ja = json.load(f)
    with open(osp.join(d, 'annotations', 'instances_train.json')) as f:
        jd = json.load(f)
    first = [x for x in jd['annotations'] if x['image_id'] <= 12]
    assert first == ja['annotations']
    # train and val are different images
    tr, _ = render_image(make_config(96), 7, 'train', 0)
    va, _ = render_image(make_config(96), 7, 'val', 0)
    assert not np.array_equal(tr, va)
    assert img_small.shape == (96, 96, 3)


def test_coco_format_loads_with_pycocotools(normal_set):
    from pycocotools.coco import COCO
    for split, n in (('train', 120), ('val', 30)):
        coco = COCO(osp.join(normal_set, 'annotations', f'instances_{split}.json'))
        assert len(coco.getImgIds()) == n
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        for img in coco.loadImgs(coco.getImgIds()[:10]):
            path = osp.join(normal_set, split, img['file_name'])
            with Image.open(path) as im:
                assert im.size == (img['width'], img['height']) == (256, 256)
                assert im.mode == 'RGB'
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256
            assert w >= 1 and h >= 1 and 0 < ann['area'] <= w * h
            assert ann['iscrowd'] in (0, 1)


def test_content_is_varied(normal_set):
    with open(osp.join(normal_set, 'annotations', 'instances_train.json')) as f:
        coco = json.load(f)
    anns = [a for a in coco['annotations'] if not a['iscrowd']]
    # every class, with a balanced-ish share
    counts = np.bincount([a['category_id'] - 1 for a in anns], minlength=len(CLASSES))
    assert counts.min() > 0.5 * counts.mean(), counts
    # several objects per image, several images without a single object class
    per_img = np.bincount([a['image_id'] for a in anns])[1:]
    assert per_img.mean() > 3 and per_img.max() >= 6
    # COCO small (< 32^2), medium and large (> 96^2) objects are all present
    areas = np.array([a['bbox'][2] * a['bbox'][3] for a in anns])
    assert (areas < 32 ** 2).mean() > 0.1
    assert ((areas >= 32 ** 2) & (areas <= 96 ** 2)).mean() > 0.2
    assert (areas > 96 ** 2).mean() > 0.03
    # occlusion: partly hidden objects, and ignored (mostly hidden) ones
    vis = np.array([a['visible'] for a in anns])
    assert (vis < 0.9).mean() > 0.05
    assert any(a['iscrowd'] for a in coco['annotations'])
    # the image is not just flat background: clutter and noise everywhere
    img = np.asarray(Image.open(osp.join(normal_set, 'train', '000000.jpg')), np.float32)
    assert img.std(axis=(0, 1)).mean() > 10


def test_easy_preset_has_no_occlusion(tmp_path):
    out = str(tmp_path / 'easy')
    generate_dataset(out, 40, 0, size=128, seed=0, difficulty='easy', verbose=False)
    with open(osp.join(out, 'annotations', 'instances_train.json')) as f:
        anns = json.load(f)['annotations']
    assert all(not a['iscrowd'] for a in anns)
    assert np.mean([a['visible'] for a in anns]) > 0.95
    assert min(a['bbox'][2] * a['bbox'][3] for a in anns) > 0.2 ** 2 * 128 ** 2 * 0.3


def test_cli_and_up_to_date_check(tmp_path):
    out = str(tmp_path / 'cli')
    cmd = [sys.executable, '-m', 'efficientvit_det.datasets.synthetic', '--out', out,
           '--num-train', '6', '--num-val', '3', '--size', '64', '--seed', '1']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert 'train: 6 images' in r.stdout and 'RuntimeWarning' not in r.stderr
    assert dataset_is_complete(out, 6, 3, size=64, seed=1)
    assert not dataset_is_complete(out, 6, 3, size=64, seed=2)
    assert not dataset_is_complete(out, 7, 3, size=64, seed=1)
    assert sorted(os.listdir(osp.join(out, 'val'))) == ['000000.jpg', '000001.jpg',
                                                       '000002.jpg']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    assert 'up to date' in r.stdout


def test_unknown_difficulty_rejected():
    with pytest.raises(ValueError):
        synthetic.make_config(64, 'impossible')
