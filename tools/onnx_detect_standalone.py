#!/usr/bin/env python
"""Detect objects with an end-to-end ONNX detector, using onnxruntime, OpenCV and numpy only.

    python tools/onnx_detect_standalone.py retinanet_m4_end2end.onnx demo.jpg [more.jpg ...] \
        --out dets.json --score-thr 0.3

Needs ``pip install onnxruntime opencv-python-headless numpy``: no torch, mmdet, mmcv or
efficientvit_det. The model is a graph written by ``tools/export_onnx.py --end2end``; its
metadata holds the preprocessing (the config's test pipeline and data preprocessor), which this
script reproduces as mmdet does it:

1. read the image with OpenCV (BGR, as mmcv's ``LoadImageFromFile``);
2. resize as mmdet's ``Resize``: with keep_ratio, the largest scale that fits ``(w, h)``
   (long edge <= max(w, h), short edge <= min(w, h)), new size ``int(side * scale + 0.5)``,
   bilinear (``cv2.INTER_LINEAR``);
3. BGR -> RGB, ``(x - mean) / std`` in float32, zero-pad bottom/right to a multiple of
   ``pad_size_divisor`` (mmdet's ``DetDataPreprocessor``);
4. run the graph with ``img_shape`` (resized height, width) and ``scale_factor``
   (w_scale, h_scale): it returns ``boxes`` (x1, y1, x2, y2 in original pixels), ``scores`` and
   ``labels`` after NMS.

Prints one line per image; ``--out`` writes tools/infer.py's JSON format.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import cv2
import numpy as np
import onnxruntime as ort

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
META_PREFIX = 'efficientvit_det.'
INTERPOLATIONS = {'nearest': cv2.INTER_NEAREST, 'bilinear': cv2.INTER_LINEAR,
                  'bicubic': cv2.INTER_CUBIC, 'area': cv2.INTER_AREA,
                  'lanczos': cv2.INTER_LANCZOS4}


def read_metadata(session: ort.InferenceSession) -> dict:
    custom = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: json.loads(v) for k, v in custom.items()
            if k.startswith(META_PREFIX)}


def resize(img: np.ndarray, spec: dict) -> tuple:
    """``(resized image, (w_scale, h_scale))`` as mmdet's ``Resize``."""
    h, w = img.shape[:2]
    scale_w, scale_h = spec['scale']
    if spec['keep_ratio']:
        factor = min(max(scale_w, scale_h) / max(h, w), min(scale_w, scale_h) / min(h, w))
        new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    else:
        new_w, new_h = int(scale_w), int(scale_h)
    out = cv2.resize(img, (new_w, new_h), interpolation=INTERPOLATIONS[spec['interpolation']])
    return out, (new_w / w, new_h / h)


def preprocess(img: np.ndarray, spec: dict) -> tuple:
    """BGR uint8 image -> ``(input (1, 3, H, W) float32, img_shape (h, w), scale_factor)``."""
    scale = (1., 1.)
    if spec.get('resize'):
        img, scale = resize(img, spec['resize'])
    x = img.astype(np.float32)
    if spec['bgr_to_rgb']:
        x = x[..., ::-1]
    x = (x - np.asarray(spec['mean'], np.float32)) / np.asarray(spec['std'], np.float32)
    h, w = x.shape[:2]
    div = max(int(spec['pad_size_divisor']), 1)
    ph, pw = -(-h // div) * div, -(-w // div) * div
    padded = np.full((ph, pw, 3), spec['pad_value'], np.float32)
    padded[:h, :w] = x
    inputs = np.ascontiguousarray(padded.transpose(2, 0, 1)[None])
    return inputs, np.asarray([h, w], np.float32), np.asarray(scale, np.float32)


def detect(session: ort.InferenceSession, spec: dict, img: np.ndarray) -> tuple:
    """``(boxes, scores, labels)`` of one BGR uint8 image."""
    inputs, img_shape, scale = preprocess(img, spec)
    return tuple(session.run(['boxes', 'scores', 'labels'],
                             {'input': inputs, 'img_shape': img_shape, 'scale_factor': scale}))


def collect(paths) -> list:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p)
                            if f.lower().endswith(IMG_EXTENSIONS))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f'input not found: {p}')
    return files


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', help='end-to-end ONNX file (tools/export_onnx.py --end2end)')
    p.add_argument('images', nargs='+', help='image files and/or folders')
    p.add_argument('--out', help='write the detections as JSON')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='minimum score printed/written (default: %(default)s)')
    p.add_argument('--threads', type=int, default=0, help='onnxruntime intra-op threads')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, so, providers=['CPUExecutionProvider'])
    meta = read_metadata(session)
    if meta.get('mode') != 'end2end' or not meta.get('preprocess'):
        print(f'error: {args.model} is not an end-to-end export with its preprocessing in the '
              'metadata (export it with tools/export_onnx.py --end2end)', file=sys.stderr)
        return 2
    classes = meta.get('classes') or []
    entries = []
    try:
        files = collect(args.images)
    except FileNotFoundError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    for path in files:
        img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            print(f'error: cannot decode {path}', file=sys.stderr)
            return 2
        boxes, scores, labels = detect(session, meta['preprocess'], img)
        dets = [{'bbox': [round(float(v), 2) for v in b], 'score': round(float(s), 4),
                 'label': int(lab), 'class': classes[lab] if lab < len(classes) else str(lab)}
                for b, s, lab in zip(boxes, scores, labels) if s >= args.score_thr]
        entries.append(dict(image=path, width=int(img.shape[1]), height=int(img.shape[0]),
                            detections=dets))
        print(f'{path}: {len(dets)} detections (score >= {args.score_thr})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(entries, f, indent=1)
        print(f'detections: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
