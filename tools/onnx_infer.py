#!/usr/bin/env python
"""Detect objects with an exported ONNX detector (float or int8) on onnxruntime or OpenVINO.

    python tools/onnx_infer.py CONFIG MODEL.onnx demo.jpg [more.jpg ...] --out dets.json
    python tools/onnx_infer.py CONFIG MODEL_int8.onnx images/ --engine openvino

CONFIG gives the test pipeline (resize, normalisation, padding) and the head's post-processing
settings (anchors, box coder, score threshold, NMS); it must be the config the model was
exported from. Steps per batch of images (docs/deploy.md):

1. ``preprocess_images``: the config's test pipeline + ``DetDataPreprocessor``, as
   ``model.test_step`` does;
2. the engine runs the graph (``--engine ort``: onnxruntime's CPU provider, the default;
   ``--engine openvino``: OpenVINO's CPU plugin, an optional dependency: ``pip install
   openvino``): raw ``cls_score_*`` / ``bbox_pred_*`` maps, or, for an ``--end2end`` graph,
   the detections themselves (one image per run);
3. ``postprocess`` (raw graphs): mmdet's ``bbox_head.predict_by_feat`` (decode, threshold, NMS,
   rescale to the original image).

int8 graphs (``tools/export_onnx.py --int8``) run the same way; on a CPU without VNNI the tool
says that int8 is emulated there.

Prints one line per image and writes ``--out`` JSON in tools/infer.py's format:
``[{"image", "width", "height", "detections": [{"bbox": [x1, y1, x2, y2], "score", "label",
"class"}, ...]}, ...]``.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys

from efficientvit_det.cli import UserInputError, run_tool


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
    p.add_argument('--threads', type=int, default=None, help='intra-op threads of the engine')
    p.add_argument('--engine', choices=('ort', 'openvino'), default='ort',
                   help='ort: onnxruntime (default); openvino: OpenVINO, if installed')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from efficientvit_det.apis import collect_images, load_config
    from efficientvit_det.cpu import cpu_info
    from efficientvit_det.deploy import onnx_detect, read_metadata
    from efficientvit_det.deploy.runtime import require_engine
    require_engine(args.engine)
    if args.batch_size < 1:
        raise UserInputError(f'--batch-size must be >= 1, got {args.batch_size}')
    images = collect_images(args.images)
    if not osp.isfile(args.model):
        raise FileNotFoundError(f'ONNX file not found: {args.model}')
    if read_metadata(args.model).get('quantization') and not cpu_info().vnni:
        print(f'note: int8 graph on a CPU without VNNI ({cpu_info().describe()}): int8 dot '
              'products are emulated with AVX2 here (docs/deploy.md)', file=sys.stderr)
    try:
        entries = onnx_detect(load_config(args.config), args.model, images, args.score_thr,
                              args.batch_size, args.threads, engine=args.engine)
    except ValueError as exc:  # e.g. a config whose head does not fit the graph
        raise UserInputError(str(exc)) from exc
    for e in entries:
        print(f'{e["image"]}: {len(e["detections"])} detections (score >= {args.score_thr})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(entries, f, indent=1)
        print(f'detections: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
