"""Validation of COCO-format annotation files, and ``SafeCocoDataset`` that applies it.

mmdet's ``CocoDataset`` fails on a broken file with errors that name neither the file nor
the record (``json.JSONDecodeError`` from pycocotools, ``KeyError: 'bbox'``), silently
drops invalid boxes, keeps NaN boxes (they reach the loss), and silently mislabels every
class when the dataset's ``metainfo.classes`` are not in the file's category order (labels
are numbered in the file's order).  The policy here (also in ``docs/robustness.md``):

Errors (always; the file is not usable as it is), naming the file and the record:
  malformed JSON (line, column, character and the text around it), a zero-byte or non
  UTF-8 file, a missing or mistyped top-level key, an image or annotation record without a
  required field or with a mistyped one (``bbox`` must be 4 numbers, ``width``/``height``
  positive integers, ``area`` a number), duplicate image / annotation / category ids, and
  ``metainfo.classes`` that are missing from the categories, ambiguous, or listed in a
  different order than the file's categories.

Counted skips (``on_invalid='skip'``, the default; ``'raise'`` turns them into errors
naming the record), each dropped annotation counted per reason with the first few named in
the log:
  ``unknown_image`` (``image_id`` of no image), ``unknown_category`` (``category_id`` of no
  category), ``non_finite_bbox`` (NaN/inf in ``bbox`` or ``area``), ``zero_area`` (width
  or height < 1 px, or ``area`` <= 0) and ``outside_image`` (no overlap with the image).
  mmdet drops the last three itself; the first two are removed before it parses the file.

Counted, kept (never errors):
  ``partially_outside`` boxes (kept; the pipeline's ``Resize`` clips them), annotations of
  categories that are not among ``metainfo.classes`` (mmdet ignores them: training on a
  subset of classes), images without annotations and images whose annotations were all
  dropped.  Which images train is left to mmdet's ``filter_cfg``, unchanged:
  ``filter_empty_gt=True`` removes images with no annotation of the selected classes (as
  in mmdet, an image whose annotations of those classes are all invalid stays, as a
  background image), ``min_size`` removes small images.  ``SafeCocoDataset`` gives the
  same ``data_list`` as ``CocoDataset`` on every file that ``CocoDataset`` handles
  correctly, and raises a clear error when no image is left after filtering.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from numbers import Number
from typing import Dict, List, Optional, Sequence, Tuple

from mmdet.datasets import CocoDataset
from mmengine import fileio
from mmengine.logging import print_log

from efficientvit_det.registry import DATASETS
from .robust_loading import ImageLoadError

__all__ = ['CocoAnnotationError', 'CocoCheckReport', 'read_coco_json', 'check_coco',
           'check_coco_file', 'SafeCocoDataset', 'SKIP_REASONS']

SKIP_REASONS = ('unknown_image', 'unknown_category', 'non_finite_bbox', 'zero_area',
                'outside_image')
ON_INVALID = ('skip', 'raise')
MAX_EXAMPLES = 5


class CocoAnnotationError(ValueError):
    """A COCO annotation file that cannot be used as it is; the message names the file and
    the record.  One positional argument, so that mmengine's registry can re-raise it."""

    def __init__(self, message: str, path: Optional[str] = None, record: Optional[str] = None):
        super().__init__(message)
        self.path = path
        self.record = record


@dataclass
class CocoCheckReport:
    """What :func:`check_coco` found in one annotation file."""
    path: str
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    skipped: Counter = field(default_factory=Counter)          # reason -> annotations dropped
    examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> first records
    partially_outside: int = 0
    unselected_category: int = 0
    images_without_annotations: int = 0
    images_all_annotations_dropped: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def _add(self, reason: str, record: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(record)

    def summary(self) -> str:
        lines = [f'{self.path}: {self.num_images} images, {self.num_annotations} annotations, '
                 f'{self.num_categories} categories']
        if self.num_skipped:
            lines.append(f'  {self.num_skipped} invalid annotation(s) skipped:')
            for reason in SKIP_REASONS:
                if self.skipped[reason]:
                    shown = self.examples.get(reason, [])
                    more = self.skipped[reason] - len(shown)
                    lines.append(f'    {reason}: {self.skipped[reason]}, e.g. '
                                 + '; '.join(shown) + (f'; ... and {more} more' if more else ''))
        if self.partially_outside:
            lines.append(f'  {self.partially_outside} box(es) partly outside their image '
                         '(kept; clipped by the pipeline)')
        if self.unselected_category:
            lines.append(f'  {self.unselected_category} annotation(s) of categories not in '
                         'metainfo.classes (ignored, as mmdet does)')
        if self.images_without_annotations:
            lines.append(f'  {self.images_without_annotations} image(s) without annotations')
        if self.images_all_annotations_dropped:
            lines.append(f'  {self.images_all_annotations_dropped} image(s) whose annotations '
                         'were all skipped')
        return '\n'.join(lines)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def read_coco_json(path: str, backend_args: Optional[dict] = None) -> dict:
    """Read and parse a JSON annotation file, with errors that name the file and position."""
    try:
        raw = fileio.get(path, backend_args=backend_args)
    except FileNotFoundError:
        raise FileNotFoundError(f'annotation file not found: {path} (data_root + ann_file '
                                'in the dataset config)') from None
    if len(raw) == 0:
        raise CocoAnnotationError(f'{path}: the annotation file is empty (0 bytes)', path=path)
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise CocoAnnotationError(f'{path}: not UTF-8 text (byte {e.start}: {e.reason}); '
                                  'JSON annotation files must be UTF-8', path=path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        lo, hi = max(0, e.pos - 40), min(len(text), e.pos + 40)
        near = text[lo:e.pos] + ' <HERE> ' + text[e.pos:hi]
        raise CocoAnnotationError(
            f'{path}: malformed JSON at line {e.lineno}, column {e.colno} (character {e.pos}'
            f' of {len(text)}): {e.msg}; near: {near!r}', path=path,
            record=f'line {e.lineno} column {e.colno}') from None
    except RecursionError:
        raise CocoAnnotationError(f'{path}: JSON nested too deeply to parse', path=path) from None


# --------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


_NUM = (int, float)


def _is_num(v) -> bool:
    return type(v) in (int, float) or (isinstance(v, Number) and not isinstance(v, bool)
                                       and not isinstance(v, complex))


def _describe(kind: str, i: int, rec, keys: Sequence[str]) -> str:
    if not isinstance(rec, dict):
        return f'{kind}[{i}] ({type(rec).__name__} {str(rec)[:60]!r})'
    parts = ', '.join(f'{k}={rec[k]!r}' for k in keys if k in rec)
    return f'{kind}[{i}] ({parts})'


def _ann_desc(i: int, ann) -> str:
    return _describe('annotations', i, ann, ('id', 'image_id', 'category_id', 'bbox', 'area'))


def _img_desc(i: int, img) -> str:
    return _describe('images', i, img, ('id', 'file_name', 'width', 'height'))


def check_coco(data, path: str = '<dict>', classes: Optional[Sequence[str]] = None,
               on_invalid: str = 'skip',
               require_annotations: bool = True) -> Tuple[dict, CocoCheckReport]:
    """Validate a parsed COCO dict; returns ``(data_for_mmdet, report)``.

    ``data_for_mmdet`` is ``data`` with the ``unknown_image`` / ``unknown_category`` /
    ``non_finite_bbox`` annotations removed (a shallow copy; ``data`` is not modified);
    mmdet's own parsing drops the other skipped ones, exactly as it always does.
    Raises :class:`CocoAnnotationError` per the module's policy.
    """
    if on_invalid not in ON_INVALID:
        raise ValueError(f'on_invalid must be one of {ON_INVALID}, got {on_invalid!r}')

    def fail(msg: str, record: Optional[str] = None):
        raise CocoAnnotationError(f'{path}: {msg}', path=path, record=record)

    if not isinstance(data, dict):
        fail(f'the top level is a JSON {type(data).__name__}; a COCO file is an object with '
             '"images", "annotations" and "categories"')
    for key in ('images', 'categories') + (('annotations',) if require_annotations else ()):
        if key not in data:
            fail(f'no "{key}" key at the top level (found: {sorted(data)[:10]})')
    for key in ('images', 'annotations', 'categories'):
        if key in data and not isinstance(data[key], list):
            fail(f'"{key}" must be a list, got {type(data[key]).__name__}')
    images, categories = data['images'], data['categories']
    annotations = data.get('annotations', [])
    report = CocoCheckReport(path=path, num_images=len(images),
                             num_annotations=len(annotations), num_categories=len(categories))

    # -- categories ----------------------------------------------------------------
    cat_ids: Dict = {}
    for i, cat in enumerate(categories):
        desc = _describe('categories', i, cat, ('id', 'name'))
        if not isinstance(cat, dict):
            fail(f'{desc} is not an object', desc)
        if not _is_int(cat.get('id')):
            fail(f'{desc}: "id" must be an integer', desc)
        if not isinstance(cat.get('name'), str):
            fail(f'{desc}: "name" must be a string', desc)
        if cat['id'] in cat_ids:
            fail(f'{desc}: duplicate category id {cat["id"]} (also categories['
                 f'{cat_ids[cat["id"]]}])', desc)
        cat_ids[cat['id']] = i
    selected = set(cat_ids)
    if classes is not None:
        names = [c['name'] for c in categories]
        missing = [c for c in classes if c not in names]
        if missing:
            fail(f'metainfo classes {missing} are not among the categories of this file '
                 f'{names[:30]}{" ..." if len(names) > 30 else ""}: fix metainfo.classes '
                 '(names must match exactly) or the file')
        dup = sorted({n for n in names if n in classes and names.count(n) > 1})
        if dup:
            fail(f'categories {dup} appear more than once: each class must match one category')
        in_file_order = [n for n in names if n in classes]
        if list(in_file_order) != list(classes):
            fail('metainfo classes are listed in a different order than the categories of '
                 'this file; mmdet numbers the labels in the file\'s order, so class names '
                 f'would be swapped: list them as {tuple(in_file_order)}')
        selected = {c['id'] for c in categories if c['name'] in classes}

    # -- images --------------------------------------------------------------------
    img_index: Dict = {}
    for i, img in enumerate(images):
        desc = _img_desc(i, img)
        if not isinstance(img, dict):
            fail(f'{desc} is not an object', desc)
        for key in ('id', 'file_name', 'width', 'height'):
            if key not in img:
                fail(f'{desc} has no "{key}"', desc)
        if not _is_int(img['id']) and not isinstance(img['id'], str):
            fail(f'{desc}: "id" must be an integer (or a string)', desc)
        if not isinstance(img['file_name'], str) or not img['file_name']:
            fail(f'{desc}: "file_name" must be a non-empty string', desc)
        for key in ('width', 'height'):
            if not _is_int(img[key]) or img[key] <= 0:
                fail(f'{desc}: "{key}" must be a positive integer, got {img[key]!r}', desc)
        if img['id'] in img_index:
            fail(f'{desc}: duplicate image id {img["id"]!r} (also images['
                 f'{img_index[img["id"]]}])', desc)
        img_index[img['id']] = i

    # -- annotations ---------------------------------------------------------------
    ann_ids: Dict = {}
    removed: List[int] = []
    valid_per_image = [0] * len(images)
    any_per_image = [0] * len(images)
    for i, ann in enumerate(annotations):
        # The common, valid case is kept cheap (860k records in COCO train): record
        # descriptions are only formatted for a record that is reported.
        if type(ann) is not dict:
            fail(f'{_ann_desc(i, ann)} is not an object', _ann_desc(i, ann))
        try:
            aid, image_id, cat_id, bbox, area = (ann['id'], ann['image_id'],
                                                 ann['category_id'], ann['bbox'], ann['area'])
        except KeyError as e:
            fail(f'{_ann_desc(i, ann)} has no "{e.args[0]}"', _ann_desc(i, ann))
        if type(aid) not in (int, str):
            fail(f'{_ann_desc(i, ann)}: "id" must be an integer', _ann_desc(i, ann))
        if aid in ann_ids:
            fail(f'{_ann_desc(i, ann)}: duplicate annotation id {aid!r} (also annotations['
                 f'{ann_ids[aid]}])', _ann_desc(i, ann))
        ann_ids[aid] = i
        if type(bbox) is list and len(bbox) == 4:
            x, y, w, h = bbox
            ok = type(x) in _NUM and type(y) in _NUM and type(w) in _NUM and type(h) in _NUM
        else:
            ok = False
        if not ok and not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                           and all(_is_num(v) for v in bbox)):
            fail(f'{_ann_desc(i, ann)}: "bbox" must be [x, y, width, height] (4 numbers)',
                 _ann_desc(i, ann))
        if not _is_num(area):
            fail(f'{_ann_desc(i, ann)}: "area" must be a number', _ann_desc(i, ann))
        if not _is_int(cat_id):
            fail(f'{_ann_desc(i, ann)}: "category_id" must be an integer', _ann_desc(i, ann))

        reason = None
        x, y, w, h = bbox
        img_i = img_index.get(image_id) if type(image_id) in (int, str) else None
        if img_i is None:
            reason = 'unknown_image'
        else:
            any_per_image[img_i] += 1
            total = x + y + w + h + area
            if cat_id not in cat_ids:
                reason = 'unknown_category'
            elif total - total != 0:  # NaN or inf somewhere
                reason = 'non_finite_bbox'
            elif w < 1 or h < 1 or area <= 0:
                reason = 'zero_area'
            else:
                img = images[img_i]
                iw, ih = img['width'], img['height']
                if x + w <= 0 or x >= iw or y + h <= 0 or y >= ih:  # no overlap (w, h >= 1)
                    reason = 'outside_image'
                elif x < 0 or y < 0 or x + w > iw or y + h > ih:
                    report.partially_outside += 1
        if reason is not None:
            desc = _ann_desc(i, ann)
            if on_invalid == 'raise':
                extra = ''
                if reason == 'outside_image':
                    im = images[img_i]
                    extra = f' of size {im["width"]}x{im["height"]}'
                fail(f'{desc}: invalid annotation ({reason}{extra}); on_invalid=\'skip\' '
                     'drops such records instead', desc)
            report._add(reason, desc)
            if reason in ('unknown_image', 'unknown_category', 'non_finite_bbox'):
                removed.append(i)
            continue
        if cat_id not in selected:
            report.unselected_category += 1
            continue
        valid_per_image[img_i] += 1

    report.images_without_annotations = sum(
        1 for i in range(len(images)) if any_per_image[i] == 0)
    report.images_all_annotations_dropped = sum(
        1 for i in range(len(images)) if any_per_image[i] > 0 and valid_per_image[i] == 0)

    out = dict(data)
    if removed:
        drop = set(removed)
        out['annotations'] = [a for j, a in enumerate(annotations) if j not in drop]
    return out, report


def check_coco_file(path: str, classes: Optional[Sequence[str]] = None,
                    on_invalid: str = 'skip', require_annotations: bool = True,
                    backend_args: Optional[dict] = None) -> CocoCheckReport:
    """Read and check an annotation file; returns the report (raises on errors)."""
    data = read_coco_json(path, backend_args=backend_args)
    return check_coco(data, path, classes=classes, on_invalid=on_invalid,
                      require_annotations=require_annotations)[1]


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------
@DATASETS.register_module()
class SafeCocoDataset(CocoDataset):
    """``CocoDataset`` that validates its annotation file first (module docstring).

    Drop-in: same arguments plus ``on_invalid`` (``'skip'`` | ``'raise'``), same
    ``data_list`` as ``CocoDataset`` for valid files, same ``filter_cfg`` semantics.
    The check report is kept as ``self.check_report`` and logged.  In test mode an
    image the pipeline cannot load (``RobustLoadImageFromFile`` with
    ``on_error='skip'``) raises an error naming it (evaluation needs every image).
    """

    def __init__(self, *args, on_invalid: str = 'skip', **kwargs) -> None:
        if on_invalid not in ON_INVALID:
            raise ValueError(f'SafeCocoDataset: on_invalid must be one of {ON_INVALID}, '
                             f'got {on_invalid!r}')
        self.on_invalid = on_invalid
        self.check_report: Optional[CocoCheckReport] = None
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        data = read_coco_json(self.ann_file, backend_args=self.backend_args)
        data, report = check_coco(data, self.ann_file, classes=self.metainfo['classes'],
                                  on_invalid=self.on_invalid,
                                  require_annotations=not self.test_mode)
        self.check_report = report
        coco = type(self).COCOAPI()  # empty, then filled from the checked dict
        coco.dataset = data
        coco.createIndex()
        coco.img_ann_map, coco.cat_img_map = coco.imgToAnns, coco.catToImgs
        self.COCOAPI = lambda *_args, **_kwargs: coco  # consumed by CocoDataset's loader
        try:
            data_list = super().load_data_list()
        finally:
            del self.COCOAPI
        print_log(report.summary(), logger='current',
                  level=logging.WARNING if report.num_skipped else logging.INFO)
        return data_list

    def filter_data(self) -> List[dict]:
        data_list = super().filter_data()
        if not data_list:
            raise CocoAnnotationError(
                f'{self.ann_file}: no image left for this dataset ({len(self.data_list)} '
                f'before filtering, filter_cfg={self.filter_cfg}, test_mode='
                f'{self.test_mode}); check the file, metainfo.classes and filter_cfg',
                path=self.ann_file)
        if len(data_list) != len(self.data_list):
            print_log(f'{self.ann_file}: filter_cfg={self.filter_cfg} keeps '
                      f'{len(data_list)} of {len(self.data_list)} images',
                      logger='current', level=logging.INFO)
        return data_list

    def prepare_data(self, idx: int):
        data = super().prepare_data(idx)
        if data is None and self.test_mode:
            path = self.get_data_info(idx).get('img_path')
            raise ImageLoadError(
                f'{path}: the test/val pipeline returned no data for this image (see the '
                'warning above for the reason); evaluation needs every image: fix or '
                'remove the file, or use on_error=\'raise\' in the test pipeline',
                path=path)
        return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='Check a COCO-format annotation file')
    parser.add_argument('ann_file')
    parser.add_argument('--classes', nargs='+', help='the dataset metainfo classes, in order')
    parser.add_argument('--strict', action='store_true',
                        help="on_invalid='raise': the first invalid annotation is an error")
    parser.add_argument('--no-annotations-ok', action='store_true',
                        help='accept a file without "annotations" (test set image info)')
    args = parser.parse_args(argv)
    try:
        report = check_coco_file(args.ann_file, classes=args.classes,
                                 on_invalid='raise' if args.strict else 'skip',
                                 require_annotations=not args.no_annotations_ok)
    except (CocoAnnotationError, FileNotFoundError) as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    print(report.summary())
    return 0
