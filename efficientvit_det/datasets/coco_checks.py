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

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from numbers import Number
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

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
# Field types: the one place that says what a valid id, number or box is
# --------------------------------------------------------------------------------------
# Each test tries the exact JSON types first: check_coco runs them for every one of COCO
# train's 860k annotations.  bool is an int subclass, but True is no id and no coordinate.
_NUM = (int, float)
_ID = (int, str)


def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


def _is_num(v) -> bool:
    return type(v) in _NUM or (isinstance(v, Number) and not isinstance(v, (bool, complex)))


def _is_id(v) -> bool:
    """An image or annotation id: an integer or a string."""
    return type(v) in _ID or (isinstance(v, _ID) and not isinstance(v, bool))


def _is_bbox(v) -> bool:
    """``[x, y, width, height]``: 4 numbers (a list, or a tuple in a dict built in Python)."""
    if type(v) is list and len(v) == 4:
        x, y, w, h = v
        if type(x) in _NUM and type(y) in _NUM and type(w) in _NUM and type(h) in _NUM:
            return True
    return isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_num(c) for c in v)


# --------------------------------------------------------------------------------------
# Checking, one helper per record kind
# --------------------------------------------------------------------------------------
# Dropped before mmdet parses the file; mmdet drops the other skip reasons itself.
_REMOVED_BEFORE_MMDET = ('unknown_image', 'unknown_category', 'non_finite_bbox')


class _Index(NamedTuple):
    """What the image and category checks found, for checking the annotations."""
    images: list
    image_index: Dict          # image id -> position in images
    category_ids: Dict         # category id -> position in categories
    selected_ids: set          # ids of the categories in metainfo.classes (all without it)


def _error(path: str, msg: str, record: Optional[str] = None) -> CocoAnnotationError:
    return CocoAnnotationError(f'{path}: {msg}', path=path, record=record)


def _describe(kind: str, i: int, rec, keys: Sequence[str]) -> str:
    if not isinstance(rec, dict):
        return f'{kind}[{i}] ({type(rec).__name__} {str(rec)[:60]!r})'
    parts = ', '.join(f'{k}={rec[k]!r}' for k in keys if k in rec)
    return f'{kind}[{i}] ({parts})'


def _ann_desc(i: int, ann) -> str:
    return _describe('annotations', i, ann, ('id', 'image_id', 'category_id', 'bbox', 'area'))


def _img_desc(i: int, img) -> str:
    return _describe('images', i, img, ('id', 'file_name', 'width', 'height'))


def _check_top_level(data, path: str, require_annotations: bool) -> Tuple[list, list, list]:
    """The three record lists ``(images, categories, annotations)`` of a COCO dict."""
    if not isinstance(data, dict):
        raise _error(path, f'the top level is a JSON {type(data).__name__}; a COCO file is an '
                     'object with "images", "annotations" and "categories"')
    for key in ('images', 'categories') + (('annotations',) if require_annotations else ()):
        if key not in data:
            raise _error(path, f'no "{key}" key at the top level (found: {sorted(data)[:10]})')
    for key in ('images', 'annotations', 'categories'):
        if key in data and not isinstance(data[key], list):
            raise _error(path, f'"{key}" must be a list, got {type(data[key]).__name__}')
    return data['images'], data['categories'], data.get('annotations', [])


def _check_categories(categories: list, path: str) -> Dict:
    """Category id -> position; errors for a malformed record or a duplicate id."""
    cat_ids: Dict = {}
    for i, cat in enumerate(categories):
        desc = _describe('categories', i, cat, ('id', 'name'))
        if not isinstance(cat, dict):
            raise _error(path, f'{desc} is not an object', desc)
        if not _is_int(cat.get('id')):
            raise _error(path, f'{desc}: "id" must be an integer', desc)
        if not isinstance(cat.get('name'), str):
            raise _error(path, f'{desc}: "name" must be a string', desc)
        if cat['id'] in cat_ids:
            raise _error(path, f'{desc}: duplicate category id {cat["id"]} (also categories['
                         f'{cat_ids[cat["id"]]}])', desc)
        cat_ids[cat['id']] = i
    return cat_ids


def _check_classes(categories: list, classes: Sequence[str], path: str) -> set:
    """Ids of the categories named in ``metainfo.classes``.

    mmdet numbers the labels in the file's category order and matches names exactly, so
    a missing, ambiguous or reordered class would silently mislabel: these are errors.
    """
    names = [c['name'] for c in categories]
    missing = [c for c in classes if c not in names]
    if missing:
        raise _error(path, f'metainfo classes {missing} are not among the categories of this '
                     f'file {names[:30]}{" ..." if len(names) > 30 else ""}: fix '
                     'metainfo.classes (names must match exactly) or the file')
    dup = sorted({n for n in names if n in classes and names.count(n) > 1})
    if dup:
        raise _error(path, f'categories {dup} appear more than once: each class must match '
                     'one category')
    in_file_order = [n for n in names if n in classes]
    if list(in_file_order) != list(classes):
        raise _error(path, 'metainfo classes are listed in a different order than the '
                     'categories of this file; mmdet numbers the labels in the file\'s order, '
                     f'so class names would be swapped: list them as {tuple(in_file_order)}')
    return {c['id'] for c in categories if c['name'] in classes}


def _check_image(img, desc: str, path: str) -> None:
    """Errors for an image record without a required field or with a mistyped one."""
    if not isinstance(img, dict):
        raise _error(path, f'{desc} is not an object', desc)
    for key in ('id', 'file_name', 'width', 'height'):
        if key not in img:
            raise _error(path, f'{desc} has no "{key}"', desc)
    if not _is_id(img['id']):
        raise _error(path, f'{desc}: "id" must be an integer (or a string)', desc)
    if not isinstance(img['file_name'], str) or not img['file_name']:
        raise _error(path, f'{desc}: "file_name" must be a non-empty string', desc)
    for key in ('width', 'height'):
        if not _is_int(img[key]) or img[key] <= 0:
            raise _error(path, f'{desc}: "{key}" must be a positive integer, got {img[key]!r}',
                         desc)


def _check_images(images: list, path: str) -> Dict:
    """Image id -> position; errors for a malformed record or a duplicate id."""
    img_index: Dict = {}
    for i, img in enumerate(images):
        desc = _img_desc(i, img)
        _check_image(img, desc, path)
        if img['id'] in img_index:
            raise _error(path, f'{desc}: duplicate image id {img["id"]!r} (also images['
                         f'{img_index[img["id"]]}])', desc)
        img_index[img['id']] = i
    return img_index


def _annotation_fields(ann, i: int, ann_ids: Dict, path: str) -> tuple:
    """``(id, image_id, category_id, bbox, area)`` of a well-formed annotation record.

    Errors for a missing or mistyped field or a duplicate id; registers the id in
    ``ann_ids``.  Descriptions are only formatted for a record that is reported, to keep
    the common, valid case cheap.
    """
    if type(ann) is not dict:
        raise _error(path, f'{_ann_desc(i, ann)} is not an object', _ann_desc(i, ann))
    try:
        aid, image_id, cat_id, bbox, area = (ann['id'], ann['image_id'], ann['category_id'],
                                             ann['bbox'], ann['area'])
    except KeyError as e:
        raise _error(path, f'{_ann_desc(i, ann)} has no "{e.args[0]}"',
                     _ann_desc(i, ann)) from None
    if not _is_id(aid):
        raise _error(path, f'{_ann_desc(i, ann)}: "id" must be an integer', _ann_desc(i, ann))
    if aid in ann_ids:
        raise _error(path, f'{_ann_desc(i, ann)}: duplicate annotation id {aid!r} (also '
                     f'annotations[{ann_ids[aid]}])', _ann_desc(i, ann))
    ann_ids[aid] = i
    if not _is_bbox(bbox):
        raise _error(path, f'{_ann_desc(i, ann)}: "bbox" must be [x, y, width, height] '
                     '(4 numbers)', _ann_desc(i, ann))
    if not _is_num(area):
        raise _error(path, f'{_ann_desc(i, ann)}: "area" must be a number', _ann_desc(i, ann))
    if not _is_int(cat_id):
        raise _error(path, f'{_ann_desc(i, ann)}: "category_id" must be an integer',
                     _ann_desc(i, ann))
    return aid, image_id, cat_id, bbox, area


def _box_verdict(bbox, area, category_known: bool, img: dict) -> Optional[str]:
    """The skip reason of an annotation of a known image, ``'partially_outside'`` for a
    box that is kept but leaves its image, or ``None`` for a valid one."""
    x, y, w, h = bbox
    total = x + y + w + h + area  # NaN or inf anywhere makes total - total non-zero
    if not category_known:
        return 'unknown_category'
    if total - total != 0:
        return 'non_finite_bbox'
    if w < 1 or h < 1 or area <= 0:
        return 'zero_area'
    iw, ih = img['width'], img['height']
    if x + w <= 0 or x >= iw or y + h <= 0 or y >= ih:  # no overlap (w, h >= 1)
        return 'outside_image'
    if x < 0 or y < 0 or x + w > iw or y + h > ih:
        return 'partially_outside'
    return None


def _record_invalid(reason: str, desc: str, img: Optional[dict], on_invalid: str,
                    report: CocoCheckReport, path: str) -> None:
    """Count a skipped annotation, or (``on_invalid='raise'``) make it an error."""
    if on_invalid == 'raise':
        extra = f' of size {img["width"]}x{img["height"]}' if reason == 'outside_image' else ''
        raise _error(path, f'{desc}: invalid annotation ({reason}{extra}); on_invalid=\'skip\' '
                     'drops such records instead', desc)
    report._add(reason, desc)


def _check_annotations(annotations: list, index: _Index, on_invalid: str,
                       report: CocoCheckReport, path: str) -> List[int]:
    """Check every annotation and count it in ``report``; returns the positions of those
    to remove before mmdet parses the file."""
    ann_ids: Dict = {}
    removed: List[int] = []
    any_per_image = [0] * len(index.images)
    valid_per_image = [0] * len(index.images)
    for i, ann in enumerate(annotations):
        _, image_id, cat_id, bbox, area = _annotation_fields(ann, i, ann_ids, path)
        img_i = index.image_index.get(image_id) if _is_id(image_id) else None
        img = None if img_i is None else index.images[img_i]
        if img is None:
            reason = 'unknown_image'
        else:
            any_per_image[img_i] += 1
            reason = _box_verdict(bbox, area, cat_id in index.category_ids, img)
            if reason == 'partially_outside':  # kept: the pipeline's Resize clips it
                report.partially_outside += 1
                reason = None
        if reason is not None:
            _record_invalid(reason, _ann_desc(i, ann), img, on_invalid, report, path)
            if reason in _REMOVED_BEFORE_MMDET:
                removed.append(i)
        elif cat_id not in index.selected_ids:
            report.unselected_category += 1
        else:
            valid_per_image[img_i] += 1
    report.images_without_annotations = sum(1 for n in any_per_image if n == 0)
    report.images_all_annotations_dropped = sum(
        1 for n, valid in zip(any_per_image, valid_per_image) if n > 0 and valid == 0)
    return removed


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
    images, categories, annotations = _check_top_level(data, path, require_annotations)
    report = CocoCheckReport(path=path, num_images=len(images),
                             num_annotations=len(annotations), num_categories=len(categories))
    category_ids = _check_categories(categories, path)
    selected_ids = (set(category_ids) if classes is None
                    else _check_classes(categories, classes, path))
    index = _Index(images, _check_images(images, path), category_ids, selected_ids)
    removed = _check_annotations(annotations, index, on_invalid, report, path)
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
