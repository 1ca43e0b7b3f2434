#!/usr/bin/env python
"""Detect objects with an exported ONNX detector and onnxruntime (CPU).

    python tools/onnx_infer.py CONFIG MODEL.onnx demo.jpg [more.jpg ...] --out dets.json

CONFIG gives the test pipeline (resize, normalisation, padding) and the head's post-processing
settings (anchors, box coder, score threshold, NMS); it must be the config the model was
exported from. Steps per batch of images (docs/deploy.md):

1. ``preprocess_images``: the config's test pipeline + ``DetDataPreprocessor``, as
   ``model.test_step`` does;
2. onnxruntime runs the graph: raw ``cls_score_*`` / ``bbox_pred_*`` maps;
3. ``postprocess``: mmdet's ``bbox_head.predict_by_feat`` (decode, threshold, NMS, rescale to
   the original image).

Prints one line per image and writes ``--out`` JSON in tools/infer.py's format:
``[{"image", "width", "height", "detections": [{"bbox": [x1, y1, x2, y2], "score", "label",
"class"}, ...]}, ...]``.
"""
from __future__ import annotations

import argparse
import json
import sys

from efficientvit_det.apis import collect_images, load_config
from efficientvit_det.deploy import onnx_detect


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='the config the model was exported from')
    p.add_argument('model', help='ONNX detector from tools/export_onnx.py (not --backbone-only)')
    p.add_argument('images', nargs='+', help='image files and/or folders of images')
    p.add_argument('--out', default=None, help='write the detections as JSON')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='minimum score written/printed (default: %(default)s); the head\'s '
                        'test_cfg.score_thr applies before NMS as in PyTorch')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--threads', type=int, default=None, help='onnxruntime intra-op threads')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        images = collect_images(args.images)
        entries = onnx_detect(load_config(args.config), args.model, images, args.score_thr,
                              args.batch_size, args.threads)
    except (FileNotFoundError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    for e in entries:
        print(f'{e["image"]}: {len(e["detections"])} detections (score >= {args.score_thr})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(entries, f, indent=1)
        print(f'detections: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
