#!/usr/bin/env python
"""Export an EfficientViT detector (or its backbone) to ONNX in deploy mode.

    python tools/export_onnx.py CONFIG CHECKPOINT --out work_dirs/retinanet_m4.onnx
    python tools/export_onnx.py CONFIG CHECKPOINT --out backbone.onnx --backbone-only
    python tools/export_onnx.py CONFIG none --out random.onnx --shape 512 512   # random weights

The model is built from CONFIG, its weights are loaded from CHECKPOINT (``torch.load`` with
``weights_only=True``, strict key match; ``none`` keeps random weights: smoke tests and latency
only), every Conv+BN is folded (deploy mode) and the graph is traced at ``--shape`` with dynamic
batch, height and width. The detector graph ends at RetinaNet's raw head outputs
(``cls_score_{l}``, ``bbox_pred_{l}`` per level); decode + NMS run afterwards with
``efficientvit_det.deploy.postprocess`` (see docs/deploy.md and tools/onnx_infer.py).

After writing, the file is checked with ``onnx.checker`` and onnxruntime is compared with the
PyTorch model at the export size and at a second size that is a multiple of neither 7 nor 32
(``--verify-shape`` adds more, ``--no-verify`` skips); the tool fails when an output differs by
more than ``--rel-tol`` of its scale.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='model config file')
    p.add_argument('checkpoint', help="trained checkpoint (.pth), or 'none' for random weights")
    p.add_argument('--out', required=True, help='ONNX file to write')
    p.add_argument('--shape', type=int, nargs=2, default=(800, 1344), metavar=('H', 'W'),
                   help='input size the graph is traced at (the graph accepts any size; '
                        'default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=1, help='batch of the example input (the '
                   'batch axis is dynamic anyway)')
    p.add_argument('--backbone-only', action='store_true', help='export the backbone alone')
    p.add_argument('--opset', type=int, default=None,
                   help='ONNX opset, 9..20 (default: efficientvit_det.deploy.DEFAULT_OPSET, 17)')
    p.add_argument('--verify-shape', type=int, nargs=2, action='append', default=None,
                   metavar=('H', 'W'), help='extra input size to compare onnxruntime with '
                   'PyTorch at (repeatable)')
    p.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    p.add_argument('--rel-tol', type=float, default=1e-4,
                   help='max |onnxruntime - PyTorch| / max |PyTorch| per output (default: %(default)s)')
    p.add_argument('--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
                   help='override config entries (mmengine DictAction syntax)')
    p.add_argument('--json', metavar='FILE', default=None,
                   help='also write the export summary (names, verification) as JSON')
    return p.parse_args(argv)


def _cfg_options(items):
    if not items:
        return None
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    return parser.parse_args(['--o', *items]).o


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.shape) < 32:
        print(f'error: --shape {args.shape}: both sides must be >= 32', file=sys.stderr)
        return 2
    no_weights = str(args.checkpoint).lower() == 'none'
    for path, what in ((args.config, 'config'), (None if no_weights else args.checkpoint, 'checkpoint')):
        if path is not None and not osp.isfile(path):
            print(f'error: {what} not found: {path}', file=sys.stderr)
            return 2
    if no_weights:
        print('warning: CHECKPOINT is none: exporting random weights (for smoke tests and '
              'latency measurements only)', file=sys.stderr)
    from efficientvit_det.deploy import (DEFAULT_OPSET, export_onnx, fuse_for_deploy, load_model,
                                         other_verify_shape)
    model, cfg = load_model(args.config, None if no_weights else args.checkpoint,
                            cfg_options=_cfg_options(args.cfg_options))
    fuse_for_deploy(model)

    shape = tuple(args.shape)
    verify = [] if args.no_verify else [shape, other_verify_shape(shape)] + \
        [tuple(s) for s in args.verify_shape or ()]
    metadata = dict(config=osp.basename(args.config),
                    checkpoint=None if no_weights else osp.basename(args.checkpoint))
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes')
    if classes:
        metadata['classes'] = list(classes)
    try:
        result = export_onnx(model, args.out, shape=shape, backbone_only=args.backbone_only,
                             opset=args.opset or DEFAULT_OPSET, batch_size=args.batch_size,
                             verify_shapes=verify, rel_tol=args.rel_tol, metadata=metadata)
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


if __name__ == '__main__':
    sys.exit(main())
