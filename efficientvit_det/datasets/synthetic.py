"""Deterministic generator of a COCO-format detection dataset ("synthetic shapes").

The built-in default dataset of efficientvit_det: it needs no download, is reproducible
bit for bit from its seed, and is hard enough that COCO mAP is informative.

What an image holds (the ``normal`` preset; ``easy`` and ``hard`` in :data:`PRESETS`)
------------------------------------------------------------------------------------
* Six object classes told apart mainly by **shape** (circle, square, triangle, star, ring,
  cross).  Each class has a preferred colour family, but 15% of the objects take a random
  colour (30% in ``hard``), and 30% get a texture (stripes, checker, dots, gradient; 60%
  in ``hard``), so colour alone does not solve the task.
* 2-6 objects from 12% to 45% of the image side (``hard``: up to 8, from 5%, COCO
  "small", to 50%), log-uniformly distributed, randomly rotated and slightly deformed.
* Background clutter: a smooth random colour field, low-contrast rectangles, lines, pixel
  noise and JPEG compression.
* Unlabelled distractors: elongated ellipses, thick line segments and irregular blobs, some
  drawn behind the objects and some in front of them (occluders).
* Occlusion: objects overlap each other (partly: their centres keep half their radii
  apart; without limit in ``hard``) and distractors overlap objects.  Each annotation is
  the bounding box of the *visible* part (COCO convention), ``area`` is its visible pixel
  count and ``segmentation`` its visible mask (COCO RLE, :func:`encode_mask`: exact, with
  the ring's hole and the holes occluders make).  Objects with less than 30% visible are
  marked ``iscrowd=1`` (ignored by the COCO evaluation and by training), as COCO does for
  regions that cannot be labelled.

Layout written under ``--out``::

    out/
      train/000000.jpg ...
      val/000000.jpg ...
      annotations/instances_train.json
      annotations/instances_val.json
      synthetic_meta.json          # generation parameters (used to detect stale data)

The same layout as COCO (``train2017/`` -> ``train/``), so mmdet's ``CocoDataset`` reads
it with ``data_prefix=dict(img='train/')`` and ``metainfo=dict(classes=CLASSES)``.

Every image is generated from its own random stream, seeded by ``(seed, split, index)``:
the output does not depend on the order of generation nor on the number of images asked
for (the first N images of a larger run are identical to a run with N images).

Usage::

    python -m efficientvit_det.datasets.synthetic --out data/synthetic \
        --num-train 2000 --num-val 200 --size 128 --seed 0 [--difficulty normal|easy|hard]
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import os.path as osp
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = [
    'CLASSES', 'PALETTE', 'SynthConfig', 'PRESETS', 'generate_dataset', 'render_image',
    'dataset_is_complete', 'encode_mask', 'main'
]

GENERATOR_VERSION = 2

CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')
# Preferred hue per class (degrees) and the palette used by visualisers (RGB).
_CLASS_HUES = (0.0, 120.0, 220.0, 50.0, 300.0, 180.0)
PALETTE: Tuple[Tuple[int, int, int], ...] = ((220, 20, 60), (0, 160, 0), (0, 60, 230),
                                              (230, 190, 0), (200, 0, 200), (0, 190, 190))
_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
_SS = 4  # supersampling factor of the shape masks (anti-aliasing)


@dataclass
class SynthConfig:
    """Parameters of the generator (one preset per difficulty)."""
    size: int = 128
    min_objects: int = 2
    max_objects: int = 8
    min_scale: float = 0.05    # object side / image side
    max_scale: float = 0.5
    class_colour_prob: float = 0.7
    textured_prob: float = 0.6
    max_distractors: int = 6
    front_distractor_prob: float = 0.35
    clutter: float = 1.0       # strength of background clutter and pixel noise
    min_visible: float = 0.3   # below: iscrowd=1 (ignored)
    allow_overlap: bool = True
    min_separation: float = 0.0  # objects' centre distance / (r1 + r2), when overlapping
    jpeg_quality: int = 90


PRESETS: Dict[str, dict] = {
    # The built-in task (what the demo trains on): 2-6 objects of 12-45% of the image side,
    # mostly in class colours, some textured, partial occlusions by each other and by
    # distractors, moderate clutter.  Hard enough that mAP means something, clear enough
    # that a detector trained from scratch on a CPU in minutes finds most objects.
    'normal': dict(min_objects=2, max_objects=6, min_scale=0.12, max_scale=0.45,
                   class_colour_prob=0.85, textured_prob=0.3, max_distractors=3,
                   front_distractor_prob=0.3, clutter=0.5, min_separation=0.5),
    # Large, few, unoccluded objects in class colours on a calm background: a split a short
    # training run learns.
    'easy': dict(min_objects=1, max_objects=3, min_scale=0.25, max_scale=0.55,
                 class_colour_prob=1.0, textured_prob=0.0, max_distractors=0,
                 front_distractor_prob=0.0, clutter=0.3, allow_overlap=False),
    # Up to 8 objects from 5% of the side (COCO small) to half of it, 30% in random colours,
    # most textured, heavy clutter, up to 6 distractors and overlaps without limit.
    'hard': dict(),
}


def make_config(size: int = 128, difficulty: str = 'normal') -> SynthConfig:
    if difficulty not in PRESETS:
        raise ValueError(f'unknown difficulty {difficulty!r}; choose from {sorted(PRESETS)}')
    return SynthConfig(size=size, **PRESETS[difficulty])


# --------------------------------------------------------------------------- colours


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _object_colour(rng: np.random.Generator, label: int, cfg: SynthConfig) -> np.ndarray:
    if rng.random() < cfg.class_colour_prob:
        hue = _CLASS_HUES[label] + rng.uniform(-18, 18)
    else:
        hue = rng.uniform(0, 360)
    return _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))


# --------------------------------------------------------------------------- shapes


def _regular_polygon(n: int, r: float, rot: float, aspect: float = 1.0,
                     jitter: float = 0.0, rng: Optional[np.random.Generator] = None,
                     start: float = -math.pi / 2) -> List[Tuple[float, float]]:
    pts = []
    for i in range(n):
        a = start + 2 * math.pi * i / n
        rr = r * (1.0 + (rng.uniform(-jitter, jitter) if (jitter and rng is not None) else 0.0))
        pts.append((rr * math.cos(a) * aspect, rr * math.sin(a)))
    return _rotate(pts, rot)


def _rotate(pts, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _star(r: float, rot: float, inner: float, points: int = 5):
    pts = []
    for i in range(2 * points):
        a = -math.pi / 2 + math.pi * i / points
        rr = r if i % 2 == 0 else r * inner
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return _rotate(pts, rot)


def _cross(r: float, rot: float, arm: float):
    w = r * arm / 2
    pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
           (-r, w), (-r, -w), (-w, -w)]
    return _rotate(pts, rot)


def _shape_mask(kind: str, r: float, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased alpha mask (float32 in [0, 1]) of a shape centred in a square canvas.

    ``r`` is the half size in pixels.  The canvas side is ``2 * ceil(r) + 3``.
    """
    half = int(math.ceil(r)) + 1
    side = 2 * half + 1
    big = Image.new('L', (side * _SS, side * _SS), 0)
    draw = ImageDraw.Draw(big)
    c = (half + 0.5) * _SS
    R = r * _SS
    rot = rng.uniform(0, 2 * math.pi)

    def poly(pts):
        draw.polygon([(c + x, c + y) for x, y in pts], fill=255)

    if kind in ('circle', 'ring'):
        ax = R * rng.uniform(0.9, 1.0)
        ay = R * rng.uniform(0.9, 1.0)
        draw.ellipse([c - ax, c - ay, c + ax, c + ay], fill=255)
        if kind == 'ring':
            k = rng.uniform(0.45, 0.65)
            draw.ellipse([c - ax * k, c - ay * k, c + ax * k, c + ay * k], fill=0)
    elif kind == 'square':
        poly(_regular_polygon(4, R * 1.15, rot, aspect=rng.uniform(0.85, 1.15),
                              jitter=0.04, rng=rng, start=math.pi / 4))
    elif kind == 'triangle':
        poly(_regular_polygon(3, R * 1.05, rot, jitter=0.08, rng=rng))
    elif kind == 'star':
        poly(_star(R, rot, inner=rng.uniform(0.38, 0.5), points=5))
    elif kind == 'cross':
        poly(_cross(R * 0.98, rot, arm=rng.uniform(0.55, 0.8)))
    elif kind == 'ellipse':  # distractor: clearly elongated
        ax, ay = R, R * rng.uniform(0.2, 0.45)
        pts = [(ax * math.cos(t), ay * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48)]
        poly(_rotate(pts, rot))
    elif kind == 'bar':  # distractor: thick line segment
        w = R * rng.uniform(0.06, 0.15)
        poly(_rotate([(-R, -w), (R, -w), (R, w), (-R, w)], rot))
    elif kind == 'blob':  # distractor: irregular polygon
        n = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = R * rng.uniform(0.35, 1.0, n)
        poly([(rr * math.cos(a), rr * math.sin(a)) for a, rr in zip(angles, radii)])
    else:
        raise ValueError(kind)
    small = big.resize((side, side), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, h: int, w: int, colour: np.ndarray,
             textured: bool) -> np.ndarray:
    """(h, w, 3) float32 fill pattern for an object of the given base colour."""
    base = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if not textured:
        shade = rng.uniform(-12, 12, size=3).astype(np.float32)
        return np.clip(base + shade, 0, 255)
    kind = rng.choice(['stripes', 'checker', 'dots', 'gradient'])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    alt = np.clip(colour * rng.uniform(0.35, 0.7) + rng.uniform(0, 60), 0, 255)
    period = rng.uniform(3.0, 9.0)
    if kind == 'stripes':
        a = rng.uniform(0, math.pi)
        m = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0)
    elif kind == 'checker':
        m = ((xx // period).astype(int) + (yy // period).astype(int)) % 2 == 0
    elif kind == 'dots':
        m = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.2) ** 2
    else:  # gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        return (base * (1 - t[..., None]) + alt * t[..., None]).astype(np.float32)
    return np.where(m[..., None], base, alt).astype(np.float32)


# --------------------------------------------------------------------------- background


def _smooth_field(rng: np.random.Generator, size: int, cells: int, amp: float) -> np.ndarray:
    """Low-frequency random colour field (bilinear up-sampling of a coarse grid)."""
    grid = rng.uniform(-amp, amp, size=(cells, cells, 3)).astype(np.float32)
    chans = [
        np.asarray(Image.fromarray(grid[..., k]).resize((size, size), Image.BILINEAR))
        for k in range(3)
    ]
    return np.stack(chans, -1)


def _background(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    s = cfg.size
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.35, 0.85))
    img = np.broadcast_to(base, (s, s, 3)).astype(np.float32).copy()
    img += _smooth_field(rng, s, int(rng.integers(2, 6)), 40.0 * max(cfg.clutter, 0.2))
    if cfg.clutter > 0:
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        n_rect = int(rng.integers(0, int(6 * cfg.clutter) + 1))
        for _ in range(n_rect):  # low-contrast rectangles
            x0, y0 = rng.uniform(-0.2, 1.0, 2) * s
            w, h = rng.uniform(0.1, 0.6, 2) * s
            tone = np.clip(base + rng.uniform(-45, 45, 3) * cfg.clutter, 0, 255)
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in tone))
        n_lines = int(rng.integers(0, int(5 * cfg.clutter) + 1))
        for _ in range(n_lines):  # thin lines
            p = rng.uniform(0, s, 4)
            tone = tuple(int(v) for v in rng.uniform(0, 255, 3))
            draw.line([p[0], p[1], p[2], p[3]], fill=tone, width=int(rng.integers(1, 3)))
        img = np.asarray(pil, dtype=np.float32).copy()
    return img


# --------------------------------------------------------------------------- one image


def _paste(canvas: np.ndarray, owner: np.ndarray, alpha: np.ndarray, fill: np.ndarray,
           x0: int, y0: int, owner_id: int) -> None:
    """Alpha-composite ``fill`` through ``alpha`` at (x0, y0); claim pixels in ``owner``."""
    H, W = owner.shape
    h, w = alpha.shape
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, W - x0), min(h, H - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    a = alpha[ay0:ay1, ax0:ax1, None]
    f = fill[ay0:ay1, ax0:ax1]
    region = canvas[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1]
    region[...] = region * (1 - a) + f * a
    o = owner[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1]
    o[a[..., 0] >= 0.5] = owner_id


def _place(rng: np.random.Generator, cfg: SynthConfig, r: float, placed: list,
           is_object: bool) -> Optional[Tuple[float, float]]:
    """A centre for an item of half size ``r``, or None when 30 tries found no room.

    ``placed`` holds ``(cx, cy, r, is_object)`` of the items already drawn.
    """
    s = cfg.size
    for _ in range(30):
        if cfg.allow_overlap:
            # centres may lie a little outside the image: truncated objects
            cx = rng.uniform(-0.15 * r, s + 0.15 * r)
            cy = rng.uniform(-0.15 * r, s + 0.15 * r)
            # objects keep min_separation from each other: partial, not total, overlaps
            sep = cfg.min_separation
            if not is_object or all((cx - px) ** 2 + (cy - py) ** 2 >= (sep * (r + pr)) ** 2
                                    for px, py, pr, obj in placed if obj):
                return cx, cy
            continue
        cx = rng.uniform(r, s - r) if s > 2 * r else s / 2
        cy = rng.uniform(r, s - r) if s > 2 * r else s / 2
        if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr, _ in placed):
            return cx, cy
    return None


def render_image(cfg: SynthConfig, seed: int, split: str, index: int,
                 return_masks: bool = False):
    """Render one image. Returns (uint8 HxWx3 RGB array, list of annotation dicts), plus the
    list of visible masks (bool HxW, one per annotation) when ``return_masks``.

    Annotation dicts hold ``category_id`` (1-based), ``bbox`` [x, y, w, h] of the visible
    part, ``area`` (visible pixels), ``segmentation`` (COCO RLE of the visible part, see
    :func:`encode_mask`), ``iscrowd`` and ``visible`` (visible fraction).
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, GENERATOR_VERSION])
    s = cfg.size
    canvas = _background(rng, cfg)
    owner = np.zeros((s, s), np.int32)  # 0 background, >0 object id, -1 distractor

    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_dis = int(rng.integers(0, cfg.max_distractors + 1)) if cfg.max_distractors else 0
    # Drawing order: distractors behind the objects, the objects (which occlude each
    # other), then the distractors in front of them (occluders).
    n_front = int(sum(rng.random() < cfg.front_distractor_prob for _ in range(n_dis)))
    items = ['dis'] * (n_dis - n_front) + ['obj'] * n_obj + ['dis'] * n_front

    objects = []  # (label, un-occluded pixel count)
    placed = []
    log_lo, log_hi = math.log(cfg.min_scale), math.log(cfg.max_scale)
    for kind in items:
        side = math.exp(rng.uniform(log_lo, log_hi)) * s
        r = max(side / 2.0, 3.0)
        pos = _place(rng, cfg, r, placed, kind == 'obj')
        if pos is None:
            continue
        cx, cy = pos
        placed.append((cx, cy, r, kind == 'obj'))
        if kind == 'obj':
            label = int(rng.integers(0, len(CLASSES)))
            alpha = _shape_mask(CLASSES[label], r, rng)
            colour = _object_colour(rng, label, cfg)
            textured = rng.random() < cfg.textured_prob
            owner_id = len(objects) + 1
            objects.append((label, float((alpha >= 0.5).sum())))
        else:
            dkind = rng.choice(['ellipse', 'bar', 'blob'])
            alpha = _shape_mask(str(dkind), r, rng)
            colour = _hsv(rng.uniform(0, 360), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
            textured = rng.random() < 0.5
            owner_id = -1
        fill = _texture(rng, alpha.shape[0], alpha.shape[1], colour, textured)
        half = alpha.shape[0] // 2
        _paste(canvas, owner, alpha, fill, int(round(cx)) - half, int(round(cy)) - half,
               owner_id)

    # pixel noise + mild blur of nothing: JPEG adds the rest
    if cfg.clutter > 0:
        canvas += rng.normal(0, 6.0 * cfg.clutter, canvas.shape).astype(np.float32)
    img = np.clip(canvas, 0, 255).astype(np.uint8)

    anns, masks = [], []
    for k, (label, full) in enumerate(objects):
        vis = owner == (k + 1)
        n_vis = int(vis.sum())
        if n_vis < 4:
            continue  # fully hidden / outside the image: not an object of this image
        ys, xs = np.nonzero(vis)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        # visible fraction against the un-occluded, un-truncated mask
        frac = n_vis / max(full, 1)
        w, h = x1 - x0, y1 - y0
        small_box = min(w, h) < 4
        anns.append(dict(category_id=label + 1, bbox=[x0, y0, w, h], area=float(n_vis),
                         segmentation=encode_mask(vis),
                         iscrowd=int(frac < cfg.min_visible or small_box),
                         visible=round(float(min(frac, 1.0)), 3)))
        masks.append(vis)
    return (img, anns, masks) if return_masks else (img, anns)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE (``{'size': [h, w], 'counts': str}``) of a bool HxW mask.

    RLE rather than polygons: a visible region can have holes (the ring's, or an occluder
    drawn inside a shape) and several pieces (an object cut in two by a bar), and COCO
    polygons are filled and unioned, so they cannot express holes.  RLE is exact, and
    pycocotools, mmdet's ``LoadAnnotations(with_mask=True)`` and ``CocoMetric`` read it.
    """
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']], counts=rle['counts'].decode('ascii'))


# --------------------------------------------------------------------------- dataset


def _split_json(cfg: SynthConfig, split: str, num: int, seed: int, out: str) -> dict:
    img_dir = osp.join(out, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num):
        img, anns = render_image(cfg, seed, split, i)
        name = f'{i:06d}.jpg'
        Image.fromarray(img).save(osp.join(img_dir, name), quality=cfg.jpeg_quality)
        images.append(dict(id=i + 1, file_name=name, width=cfg.size, height=cfg.size))
        for a in anns:
            annotations.append(dict(id=ann_id, image_id=i + 1, **a))
            ann_id += 1
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)]
    return dict(info=dict(description=f'efficientvit_det synthetic shapes ({split})',
                          version=str(GENERATOR_VERSION)),
                licenses=[], images=images, annotations=annotations, categories=categories)


def _meta(cfg: SynthConfig, num_train: int, num_val: int, seed: int) -> dict:
    return dict(generator_version=GENERATOR_VERSION, num_train=num_train, num_val=num_val,
                seed=seed, config=asdict(cfg), classes=list(CLASSES))


def dataset_is_complete(out: str, num_train: int, num_val: int, size: int = 128, seed: int = 0,
                        difficulty: str = 'normal') -> bool:
    """True when ``out`` holds a dataset generated with exactly these parameters."""
    meta_file = osp.join(out, 'synthetic_meta.json')
    if not osp.isfile(meta_file):
        return False
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if meta != _meta(make_config(size, difficulty), num_train, num_val, seed):
        return False
    for split, n in (('train', num_train), ('val', num_val)):
        if n and not osp.isfile(osp.join(out, 'annotations', f'instances_{split}.json')):
            return False
        if n and not osp.isfile(osp.join(out, split, f'{n - 1:06d}.jpg')):
            return False
    return True


def generate_dataset(out: str, num_train: int = 2000, num_val: int = 200, size: int = 128,
                     seed: int = 0, difficulty: str = 'normal', verbose: bool = True) -> dict:
    """Write the dataset to ``out``; returns a summary dict (image / box counts per split)."""
    cfg = make_config(size, difficulty)
    os.makedirs(osp.join(out, 'annotations'), exist_ok=True)
    meta_file = osp.join(out, 'synthetic_meta.json')
    if osp.exists(meta_file):
        os.remove(meta_file)  # written last: marks a complete dataset
    summary = {}
    for split, n in (('train', num_train), ('val', num_val)):
        if n <= 0:
            continue
        coco = _split_json(cfg, split, n, seed, out)
        with open(osp.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
        n_boxes = sum(1 for a in coco['annotations'] if not a['iscrowd'])
        summary[split] = dict(images=n, boxes=n_boxes,
                              ignored=len(coco['annotations']) - n_boxes)
        if verbose:
            print(f'[synthetic] {split}: {n} images, {n_boxes} boxes '
                  f'(+{summary[split]["ignored"]} ignored) -> {osp.join(out, split)}', flush=True)
    with open(meta_file, 'w') as f:
        json.dump(_meta(cfg, num_train, num_val, seed), f, indent=1)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description='Generate the synthetic COCO-format detection '
                                'dataset (deterministic for a given seed).')
    p.add_argument('--out', default='data/synthetic', help='output folder')
    p.add_argument('--num-train', type=int, default=2000)
    p.add_argument('--num-val', type=int, default=200)
    p.add_argument('--size', type=int, default=128, help='image side in pixels')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--difficulty', default='normal', choices=sorted(PRESETS))
    p.add_argument('--force', action='store_true',
                   help='regenerate even if an identical dataset is already there')
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.size < 32:
        raise SystemExit('--size must be >= 32')
    if not args.force and dataset_is_complete(args.out, args.num_train, args.num_val,
                                              args.size, args.seed, args.difficulty):
        print(f'[synthetic] {args.out} is up to date (use --force to regenerate)')
        return 0
    generate_dataset(args.out, args.num_train, args.num_val, args.size, args.seed,
                     args.difficulty)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
