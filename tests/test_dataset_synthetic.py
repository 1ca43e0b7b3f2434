"""The built-in synthetic COCO-format dataset: determinism, COCO validity, content."""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from efficientvit_det.datasets import synthetic
from efficientvit_det.datasets.synthetic import (
    CLASSES,
    dataset_is_complete,
    generate_dataset,
    make_config,
    render_image,
)

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
    generate_dataset(out, num_train=120, num_val=30, size=128, seed=3, verbose=False)
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
                assert im.size == (img['width'], img['height']) == (128, 128)
                assert im.mode == 'RGB'
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            assert w >= 1 and h >= 1 and 0 < ann['area'] <= w * h
            assert ann['iscrowd'] in (0, 1)
            assert coco.annToMask(ann).sum() == ann['area']  # the segmentation decodes


def _sides(anns, size):
    """Square root of each box's area, as a fraction of the image side."""
    return np.array([np.sqrt(a['bbox'][2] * a['bbox'][3]) / size for a in anns])


def test_content_is_varied(normal_set):
    with open(osp.join(normal_set, 'annotations', 'instances_train.json')) as f:
        coco = json.load(f)
    anns = [a for a in coco['annotations'] if not a['iscrowd']]
    # every class, with a balanced-ish share
    counts = np.bincount([a['category_id'] - 1 for a in anns], minlength=len(CLASSES))
    assert counts.min() > 0.5 * counts.mean(), counts
    # several objects per image
    per_img = np.bincount([a['image_id'] for a in anns])[1:]
    assert per_img.mean() > 3 and per_img.max() >= 5
    # several scales: small (< 15% of the side), medium and large (> 30%) boxes
    sides = _sides(anns, 128)
    assert (sides < 0.15).mean() > 0.15
    assert ((sides >= 0.15) & (sides <= 0.3)).mean() > 0.3
    assert (sides > 0.3).mean() > 0.08
    # occlusion: partly hidden objects, and ignored (mostly hidden) ones
    vis = np.array([a['visible'] for a in anns])
    assert (vis < 0.9).mean() > 0.2
    assert any(a['iscrowd'] for a in coco['annotations'])
    # the image is not just flat background: clutter and noise everywhere
    img = np.asarray(Image.open(osp.join(normal_set, 'train', '000000.jpg')), np.float32)
    assert img.std(axis=(0, 1)).mean() > 10


def test_hard_preset_has_coco_small_objects_and_heavy_occlusion():
    cfg = make_config(256, 'hard')
    anns = [a for i in range(60) for a in render_image(cfg, 3, 'train', i)[1]]
    kept = [a for a in anns if not a['iscrowd']]
    areas = np.array([a['bbox'][2] * a['bbox'][3] for a in kept])
    assert (areas < 32 ** 2).mean() > 0.3  # COCO small
    assert (areas > 96 ** 2).mean() > 0.01  # COCO large
    assert len(kept) / 60 > 4
    assert len(anns) - len(kept) >= 3  # mostly hidden objects, ignored
    normal = make_config(256, 'normal')
    normal_small = np.mean([a['bbox'][2] * a['bbox'][3] < 32 ** 2
                            for i in range(60) for a in render_image(normal, 3, 'train', i)[1]])
    assert (areas < 32 ** 2).mean() > 2 * normal_small


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


# --------------------------------------------------------------------------- instance masks


def _bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1 - int(xs.min()),
            int(ys.max()) + 1 - int(ys.min())]


def test_masks_are_the_generators_visible_regions():
    """Every annotation's segmentation decodes (pycocotools) to exactly the generator's own
    visible mask; bbox and area are those of the mask; visible regions never overlap."""
    from pycocotools import mask as mask_utils
    cfg = make_config(128)
    n_anns = n_holes = 0
    for i in range(40):
        img, anns, masks = render_image(cfg, 0, 'train', i, return_masks=True)
        assert len(anns) == len(masks)
        covered = np.zeros(img.shape[:2], np.int32)
        for ann, own in zip(anns, masks):
            seg = ann['segmentation']
            assert seg['size'] == [128, 128] and isinstance(seg['counts'], str)
            decoded = mask_utils.decode(dict(size=seg['size'], counts=seg['counts'].encode()))
            assert decoded.dtype == np.uint8 and decoded.shape == (128, 128)
            np.testing.assert_array_equal(decoded.astype(bool), own)
            assert ann['area'] == own.sum() == mask_utils.area(
                dict(size=seg['size'], counts=seg['counts'].encode()))
            assert ann['bbox'] == _bbox_of(own)
            covered += own
            n_anns += 1
            # a ring seen whole has a hole: the centre of its box is not in its mask
            if CLASSES[ann['category_id'] - 1] == 'ring' and ann['visible'] > 0.99:
                x, y, w, h = ann['bbox']
                assert not own[y + h // 2, x + w // 2]
                n_holes += 1
        assert covered.max() <= 1  # one owner per pixel
    assert n_anns > 100 and n_holes > 0


def test_masks_match_the_rendered_pixels():
    """Independent of the generator's bookkeeping: in flat-coloured renderings with partial
    occlusions, the pixels nearer the object's colour than the surrounding background's are
    the mask (the generator's rule: a pixel belongs to the shape drawn last that covers at
    least half of it).  A mask one pixel off scores ~0.89 here."""
    cfg = make_config(128, 'easy')
    cfg.clutter = 0.0  # no pixel noise: an object's fill is one flat colour
    cfg.allow_overlap, cfg.min_separation, cfg.max_objects = True, 0.4, 5  # occlusions
    ious = []
    for i in range(30):
        img, _, masks = render_image(cfg, 1, 'val', i, return_masks=True)
        img = img.astype(np.float32)
        for k, own in enumerate(masks):
            others = np.zeros_like(own)
            for j, m in enumerate(masks):
                others |= m if j != k else False
            region = _grow(own, 3) & ~others  # the object and its surroundings
            obj_colour = np.median(img[_erode(own)], axis=0)
            bg_colour = np.median(img[region & ~_grow(own, 1)], axis=0)
            nearer_obj = (np.linalg.norm(img - obj_colour, axis=-1)
                          < np.linalg.norm(img - bg_colour, axis=-1)) & region
            ious.append((nearer_obj & own).sum() / (nearer_obj | own).sum())
    assert len(ious) > 50
    assert np.mean(ious) > 0.98 and np.min(ious) > 0.93, (np.mean(ious), np.min(ious))


def _erode(m):
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    return out


def _dilate(m):
    return ~_erode(~m)


def _grow(m, steps):
    for _ in range(steps):
        m = _dilate(m)
    return m


def _decode(seg):
    from pycocotools import mask as mask_utils
    return mask_utils.decode(dict(size=seg['size'], counts=seg['counts'].encode())).astype(bool)


def test_mmdet_loads_masks_and_evaluates_segm(tmp_path):
    """mmdet reads the masks (LoadAnnotations(with_mask=True)) and CocoMetric evaluates
    bbox + segm on the files: the ground truth as predictions scores 1.0, masks shifted by
    a few pixels score less."""
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from mmengine.registry import init_default_scope

    import efficientvit_det  # noqa: F401
    init_default_scope('mmdet')
    out = str(tmp_path / 'seg')
    generate_dataset(out, 0, 12, size=96, seed=5, verbose=False)
    pipeline = [dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', with_bbox=True, with_mask=True)]
    ds = CocoDataset(data_root=out, ann_file='annotations/instances_val.json',
                     data_prefix=dict(img='val/'), metainfo=dict(classes=CLASSES),
                     pipeline=pipeline, test_mode=True)
    assert len(ds) == 12
    n_checked = 0
    for idx in range(len(ds)):
        item = ds[idx]
        info = ds.get_data_info(idx)
        masks = item['gt_masks'].masks  # BitmapMasks
        assert masks.shape == (len(info['instances']), 96, 96)
        for m, inst in zip(masks, info['instances']):
            np.testing.assert_array_equal(m, _decode(inst['mask']))
            x0, y0, x1, y1 = inst['bbox']
            assert _bbox_of(m.astype(bool)) == [x0, y0, x1 - x0, y1 - y0]
            n_checked += 1
    assert n_checked > 20

    def evaluate(shift):
        metric = CocoMetric(ann_file=osp.join(out, 'annotations', 'instances_val.json'),
                            metric=['bbox', 'segm'])
        metric.dataset_meta = dict(classes=CLASSES)
        for idx in range(len(ds)):
            info = ds.get_data_info(idx)
            keep = [i for i in info['instances'] if not i['ignore_flag']]
            masks = np.zeros((len(keep), 96, 96), bool)
            for k, inst in enumerate(keep):
                masks[k] = np.roll(_decode(inst['mask']), shift, axis=1)
            pred = dict(bboxes=torch.tensor([i['bbox'] for i in keep],
                                            dtype=torch.float32).reshape(-1, 4),
                        scores=torch.ones(len(keep)),
                        labels=torch.tensor([i['bbox_label'] for i in keep], dtype=torch.long),
                        masks=torch.from_numpy(masks))
            metric.process({}, [dict(img_id=info['img_id'], ori_shape=(96, 96),
                                     pred_instances=pred)])
        return metric.evaluate(len(ds))

    exact = evaluate(0)
    assert exact['coco/bbox_mAP'] == pytest.approx(1.0, abs=1e-3)
    assert exact['coco/segm_mAP'] == pytest.approx(1.0, abs=1e-3)
    shifted = evaluate(3)
    assert shifted['coco/bbox_mAP'] == pytest.approx(1.0, abs=1e-3)  # boxes unchanged
    assert shifted['coco/segm_mAP'] < 0.9
