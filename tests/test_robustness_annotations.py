"""COCO annotation checks and SafeCocoDataset: broken files give errors naming the file and the
record; invalid records are counted skips (or errors with on_invalid='raise'); valid files
give exactly what mmdet's CocoDataset gives, filter_cfg included."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from mmdet.datasets import CocoDataset
from mmengine.registry import init_default_scope

from efficientvit_det.datasets.coco_checks import (
    CocoAnnotationError,
    SafeCocoDataset,
    check_coco,
    check_coco_file,
)
from efficientvit_det.registry import DATASETS

CLASSES = ('cat', 'dog')


def base_coco():
    images = [dict(id=i, file_name=f'{i}.jpg', width=100, height=80) for i in range(1, 7)]
    anns = [
        dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 30, 20], area=600, iscrowd=0),
        dict(id=2, image_id=1, category_id=2, bbox=[50, 40, 20, 20], area=400, iscrowd=0),
        dict(id=3, image_id=2, category_id=2, bbox=[0, 0, 100, 80], area=8000, iscrowd=0),
        dict(id=4, image_id=3, category_id=1, bbox=[5, 5, 10, 10], area=100, iscrowd=1),
        dict(id=5, image_id=4, category_id=1, bbox=[1, 1, 50, 50], area=2500, iscrowd=0),
        dict(id=6, image_id=5, category_id=2, bbox=[20, 20, 30, 30], area=900, iscrowd=0),
    ]  # image 6 has no annotation
    cats = [dict(id=1, name='cat'), dict(id=2, name='dog')]
    return dict(images=images, annotations=anns, categories=cats)


def messy_coco():
    """Loadable by CocoDataset, with every kind of record it drops silently."""
    d = base_coco()
    d['categories'].append(dict(id=3, name='bird'))  # not among CLASSES
    d['annotations'] += [
        dict(id=10, image_id=1, category_id=1, bbox=[10, 10, 0, 20], area=0, iscrowd=0),
        dict(id=11, image_id=2, category_id=1, bbox=[200, 200, 10, 10], area=100, iscrowd=0),
        dict(id=12, image_id=2, category_id=7, bbox=[10, 10, 10, 10], area=100, iscrowd=0),
        dict(id=13, image_id=4, category_id=3, bbox=[10, 10, 10, 10], area=100, iscrowd=0),
        dict(id=14, image_id=5, category_id=2, bbox=[90, 70, 30, 30], area=900, iscrowd=0),
        dict(id=15, image_id=5, category_id=1, bbox=[10, 10, 0.5, 10], area=5, iscrowd=0),
    ]
    # image 7: only invalid annotations (mmdet keeps it as a background image)
    d['images'].append(dict(id=7, file_name='7.jpg', width=100, height=80))
    d['annotations'].append(
        dict(id=16, image_id=7, category_id=1, bbox=[500, 500, 10, 10], area=100, iscrowd=0))
    # a small image, for min_size
    d['images'].append(dict(id=8, file_name='8.jpg', width=20, height=16))
    d['annotations'].append(
        dict(id=17, image_id=8, category_id=2, bbox=[1, 1, 10, 10], area=100, iscrowd=0))
    return d


def dump(tmp_path, data, name='ann.json') -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def build(cls, ann_file, **kw):
    init_default_scope('mmdet')
    kw.setdefault('metainfo', dict(classes=CLASSES))
    return cls(ann_file=ann_file, data_prefix=dict(img='imgs/'), pipeline=[], **kw)


def data_list(ds):
    return [ds.get_data_info(i) for i in range(len(ds))]


# -- malformed files: error naming the file and the position ------------------------------
def test_malformed_json_names_file_line_and_column(tmp_path):
    text = json.dumps(base_coco(), indent=1)
    bad = text.replace('"area": 400,', '"area": 400,,', 1)
    path = dump(tmp_path, bad)
    line = bad[:bad.index(',,') + 1].count('\n') + 1
    with pytest.raises(CocoAnnotationError) as e:
        check_coco_file(path)
    msg = str(e.value)
    assert path in msg and f'line {line},' in msg and 'column' in msg and '<HERE>' in msg
    # through the dataset registry (mmengine re-raises with the class name prepended)
    init_default_scope('mmdet')
    with pytest.raises(CocoAnnotationError, match=f'{path}: malformed JSON at line {line}'):
        DATASETS.build(dict(type='SafeCocoDataset', ann_file=path, metainfo=dict(
            classes=CLASSES), pipeline=[]))


def test_truncated_empty_and_binary_json(tmp_path):
    text = json.dumps(base_coco())
    with pytest.raises(CocoAnnotationError, match='malformed JSON at line 1'):
        check_coco_file(dump(tmp_path, text[:len(text) // 2]))
    with pytest.raises(CocoAnnotationError, match=r'empty \(0 bytes\)'):
        check_coco_file(dump(tmp_path, ''))
    path = tmp_path / 'bin.json'
    path.write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe')
    with pytest.raises(CocoAnnotationError, match='not UTF-8'):
        check_coco_file(str(path))
    with pytest.raises(FileNotFoundError, match='annotation file not found'):
        check_coco_file(str(tmp_path / 'missing.json'))


STRUCTURAL = {
    'top_level_list': (lambda d: [d], 'top level is a JSON list'),
    'no_images': (lambda d: {k: v for k, v in d.items() if k != 'images'}, 'no "images"'),
    'no_annotations': (lambda d: {k: v for k, v in d.items() if k != 'annotations'},
                       'no "annotations"'),
    'images_not_list': (lambda d: {**d, 'images': {}}, '"images" must be a list'),
    'ann_no_bbox': (lambda d: d['annotations'][2].pop('bbox') and d,
                    r'annotations\[2\] \(id=3, image_id=2, category_id=2.*has no "bbox"'),
    'ann_no_area': (lambda d: d['annotations'][1].pop('area') and d,
                    r'annotations\[1\] \(id=2.*has no "area"'),
    'bbox_3_values': (lambda d: d['annotations'][0].update(bbox=[1, 2, 3]) or d,
                      r'annotations\[0\] \(id=1.*bbox.*4 numbers'),
    'bbox_strings': (lambda d: d['annotations'][0].update(bbox=['1', 2, 3, 4]) or d,
                     r'annotations\[0\].*4 numbers'),
    'ann_not_object': (lambda d: d['annotations'].append(7) or d,
                       r'annotations\[6\] \(int .*not an object'),
    'image_zero_width': (lambda d: d['images'][3].update(width=0) or d,
                         r'images\[3\] \(id=4, file_name=\'4.jpg\'.*"width" must be a positive'),
    'image_no_file_name': (lambda d: d['images'][0].pop('file_name') and d,
                           r'images\[0\] \(id=1.*has no "file_name"'),
    'dup_image_id': (lambda d: d['images'][2].update(id=1) or d,
                     r'images\[2\].*duplicate image id 1 \(also images\[0\]\)'),
    'dup_ann_id': (lambda d: d['annotations'][4].update(id=1) or d,
                   r'annotations\[4\].*duplicate annotation id 1 \(also annotations\[0\]\)'),
    'dup_cat_id': (lambda d: d['categories'].append(dict(id=1, name='x')) or d,
                   'duplicate category id 1'),
    'class_missing': (lambda d: d['categories'][1].update(name='Dog') or d,
                      r"classes \['dog'\] are not among the categories"),
    'class_twice': (lambda d: d['categories'].append(dict(id=9, name='dog')) or d,
                    r"categories \['dog'\] appear more than once"),
    'class_order': (lambda d: d.update(categories=d['categories'][::-1]) or d,
                    r"different order.*\('dog', 'cat'\)"),
}


@pytest.mark.parametrize('case', sorted(STRUCTURAL))
def test_structural_errors_name_the_file_and_record(case, tmp_path):
    change, pattern = STRUCTURAL[case]
    path = dump(tmp_path, change(base_coco()))
    with pytest.raises(CocoAnnotationError, match=pattern) as e:
        build(SafeCocoDataset, path)
    assert path in str(e.value)


def test_stock_coco_dataset_really_mislabels_on_category_order(tmp_path):
    """Why the order check exists: CocoDataset numbers labels in the file's category order."""
    d = base_coco()
    d['categories'] = d['categories'][::-1]
    ds = build(CocoDataset, dump(tmp_path, d))
    first = next(x for x in data_list(ds) if x['img_id'] == 2)  # one 'dog' box
    assert CLASSES[first['instances'][0]['bbox_label']] == 'cat'  # silently wrong


# -- invalid records: counted skip, or an error naming the record ---------------------------
def test_invalid_records_are_counted_and_named(tmp_path, log):
    d = messy_coco()
    d['annotations'] += [
        dict(id=20, image_id=99, category_id=1, bbox=[1, 1, 5, 5], area=25, iscrowd=0),
        dict(id=21, image_id=1, category_id=1, bbox=[1, 1, math.inf, 5], area=25, iscrowd=0),
    ]
    path = dump(tmp_path, d)
    ds = build(SafeCocoDataset, path, filter_cfg=dict(filter_empty_gt=False))
    r = ds.check_report
    assert dict(r.skipped) == dict(zero_area=2, outside_image=2, unknown_category=1,
                                   unknown_image=1, non_finite_bbox=1)
    assert r.partially_outside == 1 and r.unselected_category == 1
    assert r.images_without_annotations == 1 and r.images_all_annotations_dropped == 1
    assert any('id=20' in e for e in r.examples['unknown_image'])
    text = log.text()
    assert '7 invalid annotation(s) skipped' in text and path in text
    assert 'annotations[' in text and 'id=16' in text  # the records are named
    boxes = [b for info in data_list(ds) for b in (i['bbox'] for i in info['instances'])]
    assert all(np.isfinite(boxes).all(axis=1))
    # the inf box would have reached the loss with the stock dataset (JSON 'Infinity')
    d2 = copy.deepcopy(d)
    del d2['annotations'][-2]  # (CocoDataset keeps records of unknown images harmlessly)
    stock = build(CocoDataset, dump(tmp_path, d2, 'stock.json'),
                  filter_cfg=dict(filter_empty_gt=False))
    stock_boxes = [i['bbox'] for info in data_list(stock) for i in info['instances']]
    assert not np.isfinite(stock_boxes).all()


@pytest.mark.parametrize('ann,reason', [
    (dict(id=30, image_id=1, category_id=1, bbox=[1, 1, 0, 5], area=0), 'zero_area'),
    (dict(id=30, image_id=1, category_id=1, bbox=[300, 1, 5, 5], area=25),
     'outside_image of size 100x80'),
    (dict(id=30, image_id=1, category_id=42, bbox=[1, 1, 5, 5], area=25), 'unknown_category'),
    (dict(id=30, image_id=77, category_id=1, bbox=[1, 1, 5, 5], area=25), 'unknown_image'),
    (dict(id=30, image_id=1, category_id=1, bbox=[1, 1, 5, math.inf], area=25),
     'non_finite_bbox'),
])
def test_on_invalid_raise_names_the_record(ann, reason, tmp_path):
    d = base_coco()
    d['annotations'].append(ann)
    path = dump(tmp_path, d)
    with pytest.raises(CocoAnnotationError) as e:
        build(SafeCocoDataset, path, on_invalid='raise')
    assert path in str(e.value) and 'annotations[6] (id=30' in str(e.value)
    assert reason in str(e.value)
    assert build(SafeCocoDataset, path).check_report.num_skipped == 1


# -- same data as CocoDataset, filter_cfg respected ---------------------------------------
@pytest.mark.parametrize('kw', [
    dict(filter_cfg=dict(filter_empty_gt=True, min_size=32)),
    dict(filter_cfg=dict(filter_empty_gt=True)),
    dict(filter_cfg=dict(filter_empty_gt=False, min_size=0)),
    dict(filter_cfg=None),
    dict(test_mode=True),
    dict(metainfo=dict(classes=('dog',)), filter_cfg=dict(filter_empty_gt=True)),
])
def test_same_data_list_as_coco_dataset(kw, tmp_path):
    path = dump(tmp_path, messy_coco())
    ours, stock = build(SafeCocoDataset, path, **kw), build(CocoDataset, path, **kw)
    assert data_list(ours) == data_list(stock)
    assert ours.metainfo == stock.metainfo and len(ours) == len(stock)


def test_filter_cfg_counts(tmp_path):
    path = dump(tmp_path, messy_coco())
    ids = lambda ds: sorted(x['img_id'] for x in data_list(ds))  # noqa: E731
    # image 6 (no annotation) goes with filter_empty_gt; image 8 (20x16) with min_size=32;
    # image 7 (only invalid annotations) stays, as in mmdet
    assert ids(build(SafeCocoDataset, path, filter_cfg=dict(filter_empty_gt=True,
                                                            min_size=32))) == [1, 2, 3, 4, 5, 7]
    assert ids(build(SafeCocoDataset, path, filter_cfg=dict(filter_empty_gt=False))) == \
        [1, 2, 3, 4, 5, 6, 7, 8]


def test_nothing_left_after_filtering_is_an_error(tmp_path):
    d = base_coco()
    d['annotations'] = []
    path = dump(tmp_path, d)
    with pytest.raises(CocoAnnotationError, match='no image left.*filter_cfg'):
        build(SafeCocoDataset, path, filter_cfg=dict(filter_empty_gt=True))
    assert len(build(SafeCocoDataset, path, filter_cfg=dict(filter_empty_gt=False))) == 6


def test_test_set_without_annotations_is_accepted(tmp_path):
    d = base_coco()
    del d['annotations']
    path = dump(tmp_path, d)
    assert len(build(SafeCocoDataset, path, test_mode=True)) == 6
    with pytest.raises(CocoAnnotationError, match='no "annotations"'):
        build(SafeCocoDataset, path)


def test_check_coco_does_not_modify_its_input():
    d = messy_coco()
    d['annotations'].append(dict(id=40, image_id=1, category_id=9, bbox=[1, 1, 5, 5], area=25))
    before = copy.deepcopy(d)
    out, report = check_coco(d, classes=CLASSES)
    assert d == before and report.skipped['unknown_category'] == 2
    assert len(out['annotations']) == len(d['annotations']) - 2


def check_annotations(*args):
    """tools/check_annotations.py as users run it."""
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools',
                        'check_annotations.py')
    return subprocess.run([sys.executable, tool, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli(tmp_path):
    good = dump(tmp_path, messy_coco(), 'good.json')
    r = check_annotations(good, '--classes', *CLASSES)
    assert r.returncode == 0 and 'invalid annotation(s) skipped' in r.stdout
    r = check_annotations(good, '--classes', *CLASSES, '--strict')
    assert r.returncode == 2 and r.stderr.startswith('error: ') and 'annotations[' in r.stderr
    bad = dump(tmp_path, '{"images": [', 'bad.json')
    r = check_annotations(bad)
    assert r.returncode == 2 and 'bad.json: malformed JSON at line 1' in r.stderr
