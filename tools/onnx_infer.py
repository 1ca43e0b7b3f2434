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
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='the config the model was exported from')
    p.add_argument('model', help='ONNX detector from tools/export_onnx.py (not --backbone-only)')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--out', default=None, help='write the detections as JSON')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='minimum score written/printed (default: %(default)s); the head\'s '
                        'test_cfg.score_thr applies before NMS as in PyTorch')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--threads', type=int, default=None, help='onnxruntime intra-op threads')
    return p.parse_args(argv)


def class_names(cfg, metadata):
    if metadata.get('classes'):
        return list(metadata['classes'])
    try:
        meta = cfg.test_dataloader.dataset.get('metainfo') or {}
        if meta.get('classes'):
            return list(meta['classes'])
        from mmdet.registry import DATASETS
        return list(DATASETS.get(cfg.test_dataloader.dataset.type).METAINFO['classes'])
    except Exception:  # noqa: BLE001 - names are cosmetic
        return []


def run(config, model, images, score_thr=0.3, batch_size=1, threads=None):
    """Detections for ``images``; returns the JSON-able list (see the module docstring)."""
    from mmengine.config import Config

    from efficientvit_det.deploy import (build_bbox_head, make_session, postprocess,
                                         preprocess_images, read_metadata, run_session)
    cfg = Config.fromfile(config)
    metadata = read_metadata(model)
    if metadata.get('mode', 'detector') != 'detector':
        raise SystemExit(f'{model} is a {metadata["mode"]} export; export the detector '
                         '(without --backbone-only)')
    session = make_session(model, threads)
    head = build_bbox_head(cfg)
    names = class_names(cfg, metadata)
    entries = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        inputs, samples = preprocess_images(cfg, chunk)
        results = postprocess(run_session(session, inputs), [s.metainfo for s in samples], head)
        for path, sample, res in zip(chunk, samples, results):
            h, w = sample.metainfo['ori_shape'][:2]
            dets = []
            for box, score, label in zip(res.bboxes.tolist(), res.scores.tolist(),
                                         res.labels.tolist()):
                if score < score_thr:
                    continue
                dets.append({'bbox': [round(v, 2) for v in box], 'score': round(score, 4),
                             'label': int(label),
                             'class': names[label] if label < len(names) else str(label)})
            entries.append(dict(image=str(path), width=int(w), height=int(h), detections=dets))
    return entries


def main(argv=None) -> int:
    args = parse_args(argv)
    for path in args.images:
        if not osp.isfile(path):
            print(f'error: image not found: {path}', file=sys.stderr)
            return 2
    entries = run(args.config, args.model, args.images, args.score_thr, args.batch_size,
                  args.threads)
    for e in entries:
        print(f'{e["image"]}: {len(e["detections"])} detections (score >= {args.score_thr})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(entries, f, indent=1)
        print(f'detections: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
