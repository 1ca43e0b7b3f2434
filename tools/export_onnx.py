#!/usr/bin/env python
"""Export an EfficientViT detector (or its backbone) to ONNX in deploy mode.

    python tools/export_onnx.py CONFIG CHECKPOINT --out work_dirs/retinanet_m4.onnx
    python tools/export_onnx.py CONFIG CHECKPOINT --out backbone.onnx --backbone-only
    python tools/export_onnx.py CONFIG none --out random.onnx --shape 512 512   # random weights
    python tools/export_onnx.py CONFIG CHECKPOINT --out det_e2e.onnx --end2end  # + decode, NMS

The model is built from CONFIG, its weights are loaded from CHECKPOINT (mmengine's loader,
weights-only pickles, strict key match; ``none`` keeps random weights: smoke tests and latency
only), it is put in deploy mode (every Conv+BN folded) and the graph is traced at ``--shape``
with dynamic batch, height and width. The detector graph ends at RetinaNet's raw head outputs
(``cls_score_{l}``, ``bbox_pred_{l}`` per level); decode + NMS run afterwards with
``efficientvit_det.deploy.postprocess`` (see docs/deploy.md and tools/onnx_infer.py).
With ``--end2end`` the graph also holds anchor generation, box decoding and NMS (ONNX
``NonMaxSuppression``): inputs ``input``, ``img_shape``, ``scale_factor``, outputs ``boxes``,
``scores``, ``labels`` (batch 1, dynamic height and width), and the preprocessing is stored in
its metadata, so it runs with onnxruntime alone (tools/onnx_detect_standalone.py).

After writing, the file is checked with ``onnx.checker`` and onnxruntime is compared with the
PyTorch model at the export size and at a second size that is a multiple of neither 7 nor 32
(``--verify-shape`` adds more, ``--no-verify`` skips); the tool fails when an output differs by
more than ``--rel-tol`` of its scale. With ``--end2end``, onnxruntime's detections are compared
with mmdet's ``model.predict`` on two synthetic images (sizes ``--shape`` and a smaller one of
another aspect ratio): same labels, boxes and scores within ``--rel-tol`` (default 1e-3 there).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

from mmengine.config import DictAction

from efficientvit_det.apis import init_detector
from efficientvit_det.deploy import DEFAULT_OPSET, export_onnx, other_verify_shape
from efficientvit_det.deploy.end2end import export_end2end, synthetic_image


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='model config file')
    p.add_argument('checkpoint', help="trained checkpoint (.pth), or 'none' for random weights")
    p.add_argument('--out', required=True, help='ONNX file to write')
    p.add_argument('--shape', type=int, nargs=2, default=(800, 1344), metavar=('H', 'W'),
                   help='input size the graph is traced at (the graph accepts any size; '
                        'default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=1, help='batch of the example input (the '
                   'batch axis is dynamic anyway)')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--backbone-only', action='store_true', help='export the backbone alone')
    mode.add_argument('--end2end', action='store_true',
                      help='detector + anchors, box decoding and NMS in the graph: outputs '
                           'boxes, scores, labels (batch 1); runs with onnxruntime alone')
    p.add_argument('--opset', type=int, default=None,
                   help='ONNX opset, 9..20 (default: efficientvit_det.deploy.DEFAULT_OPSET, 17)')
    p.add_argument('--verify-shape', type=int, nargs=2, action='append', default=None,
                   metavar=('H', 'W'), help='extra input size to compare onnxruntime with '
                   'PyTorch at (repeatable)')
    p.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--rel-tol', type=float, default=None,
                   help='max |onnxruntime - PyTorch| / max |PyTorch| per output (default: 1e-4; '
                        'with --end2end: box/score tolerance vs mmdet, default 1e-3)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config entries, xxx=yyy format')
    p.add_argument('--json', metavar='FILE', default=None,
                   help='also write the export summary (names, verification) as JSON')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.shape) < 32:
        print(f'error: --shape {args.shape}: both sides must be >= 32', file=sys.stderr)
        return 2
    no_weights = str(args.checkpoint).lower() == 'none'
    checkpoint = None if no_weights else args.checkpoint
    for path, what in ((args.config, 'config'), (checkpoint, 'checkpoint')):
        if path is not None and not osp.isfile(path):
            print(f'error: {what} not found: {path}', file=sys.stderr)
            return 2
    if no_weights:
        print('warning: CHECKPOINT is none: exporting random weights (for smoke tests and '
              'latency measurements only)', file=sys.stderr)
    model = init_detector(args.config, None if no_weights else args.checkpoint,
                          cfg_options=args.cfg_options, deploy=True)

    shape = tuple(args.shape)
    metadata = dict(config=osp.basename(args.config),
                    checkpoint=None if no_weights else osp.basename(args.checkpoint))
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes')
    if classes:
        metadata['classes'] = list(classes)
    if args.end2end:
        return _export_end2end(args, model, shape, metadata)
    verify = [] if args.no_verify else [shape, other_verify_shape(shape)] + \
        [tuple(s) for s in args.verify_shape or ()]
    try:
        result = export_onnx(model, args.out, shape=shape, backbone_only=args.backbone_only,
                             opset=args.opset or DEFAULT_OPSET, batch_size=args.batch_size,
                             verify_shapes=verify, rel_tol=args.rel_tol or 1e-4,
                             metadata=metadata)
    except AssertionError as exc:
        if osp.exists(args.out):
            os.remove(args.out)
        print(f'error: verification failed, {args.out} removed: {exc}', file=sys.stderr)
        return 1
    print(result.summary())
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(path=result.path, mode=result.mode, input_name=result.input_name,
                           output_names=result.output_names, export_shape=result.export_shape,
                           opset=result.opset, verification=result.verification), f, indent=1)
    return 0


def _export_end2end(args: argparse.Namespace, model, shape, metadata) -> int:
    verify = () if args.no_verify else [synthetic_image(shape, 1),
                                        synthetic_image((shape[0] * 3 // 4 + 5,
                                                         shape[1] // 2 + 7), 2)] + \
        [synthetic_image(s, 3 + i) for i, s in enumerate(args.verify_shape or ())]
    try:
        summary = export_end2end(model, args.out, model.cfg, shape=shape,
                                 opset=args.opset or DEFAULT_OPSET, verify_images=verify,
                                 rel_tol=args.rel_tol or 1e-3, metadata=metadata)
    except (TypeError, ValueError) as exc:  # an unsupported head or test_cfg
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except AssertionError as exc:
        if osp.exists(args.out):
            os.remove(args.out)
        print(f'error: verification failed, {args.out} removed: {exc}', file=sys.stderr)
        return 1
    print(f'wrote {summary["path"]} (end2end, opset {summary["opset"]}, traced at '
          f'{"x".join(map(str, summary["export_shape"]))}, dynamic height/width, batch 1)\n'
          f'  inputs  {", ".join(summary["input_names"])}\n'
          f'  outputs {", ".join(summary["output_names"])}')
    for v in summary['verification']:
        print(f'  verified at {v["input_shape"]}: {v["num_dets"]} detections equal to mmdet\'s '
              f'(labels equal, max box rel err {v["max_box_rel_err"]:.1e}, max score err '
              f'{v["max_score_abs_err"]:.1e}; tolerance {v["rel_tol"]:.0e})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
