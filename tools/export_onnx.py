#!/usr/bin/env python
"""Export an EfficientViT detector (or its backbone) to ONNX in deploy mode, float or int8.

    python tools/export_onnx.py CONFIG CHECKPOINT --out work_dirs/retinanet_m4.onnx
    python tools/export_onnx.py CONFIG CHECKPOINT --out backbone.onnx --backbone-only
    python tools/export_onnx.py CONFIG none --out random.onnx --shape 512 512   # random weights
    python tools/export_onnx.py CONFIG CHECKPOINT --out det_e2e.onnx --end2end  # + decode, NMS
    python tools/export_onnx.py CONFIG CHECKPOINT --out det_int8.onnx --int8 \
        --calib train --calib-images 32                                         # int8 (QDQ)

The model is built from CONFIG, its weights are loaded from CHECKPOINT (the project's safe
loader, weights-only pickles, strict key match; ``none`` keeps random weights: smoke tests and
latency only), it is put in deploy mode (every Conv+BN folded) and the graph is traced at
``--shape`` with dynamic batch, height and width. The detector graph ends at RetinaNet's raw head
outputs (``cls_score_{l}``, ``bbox_pred_{l}`` per level); decode + NMS run afterwards with
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

``--int8`` (raw or ``--end2end``) quantises that verified float graph with onnxruntime's static
post-training quantisation (QDQ: per-channel int8 weights, uint8 activations), calibrated on
``--calib-images`` images of the config's ``--calib`` split (``train`` by default; or ``val``,
``test`` or a folder) run through the config's test pipeline; ``--keep-float`` names what stays
in float (default: what docs/deploy.md measured best). It then prints how the int8 graph's
detections agree with the float graph's on two of those images. Its accuracy on a whole split:
``tools/test_onnx.py CONFIG GRAPH --checkpoint CHECKPOINT``.

An existing ``--out`` is not overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys

from mmengine.config import DictAction

from efficientvit_det.cli import UserInputError, run_tool


def parse_args(argv=None) -> argparse.Namespace:
    from efficientvit_det.deploy.quantize import (
        CALIB_METHODS,
        DEFAULT_KEEP_FLOAT,
        DEFAULT_OP_TYPES,
        KEEP_FLOAT_GROUPS,
    )
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='model config file')
    p.add_argument('checkpoint', help="trained checkpoint (.pth), or 'none' for random weights")
    p.add_argument('--out', required=True, help='ONNX file to write')
    p.add_argument('--force', action='store_true', help='overwrite --out if it exists')
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
    q = p.add_argument_group('int8 (post-training static quantisation, docs/deploy.md)')
    q.add_argument('--int8', action='store_true',
                   help='write an int8 graph (QDQ) calibrated on real images')
    q.add_argument('--calib', default='train',
                   help="calibration images: the config's train, val or test split, or a "
                        'folder of images (default: %(default)s)')
    q.add_argument('--calib-images', type=int, default=32,
                   help='number of calibration images, spread over the split (default: '
                        '%(default)s)')
    q.add_argument('--keep-float', nargs='+', default=list(DEFAULT_KEEP_FLOAT),
                   metavar='GROUP', help=f'what stays float: none or groups from '
                   f'{", ".join(KEEP_FLOAT_GROUPS)} (default: %(default)s)')
    q.add_argument('--int8-ops', nargs='+', default=list(DEFAULT_OP_TYPES), metavar='OP',
                   help='op types to quantise (default: %(default)s)')
    q.add_argument('--calib-method', choices=CALIB_METHODS, default='minmax',
                   help='activation range estimator (default: %(default)s)')
    q.add_argument('--no-reduce-range', dest='reduce_range', action='store_false',
                   help='full 8-bit weights: only for CPUs with VNNI (AVX512-VNNI, AVX-VNNI, '
                        'AMX). By default weights use 7 bits, because the AVX2 int8 kernels '
                        'of CPUs without VNNI saturate on 8-bit weights (docs/deploy.md)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config entries, xxx=yyy format')
    p.add_argument('--json', metavar='FILE', default=None,
                   help='also write the export summary (names, verification) as JSON')
    args = p.parse_args(argv)
    if args.keep_float == ['none']:
        args.keep_float = []
    return args


def _check_args(args: argparse.Namespace) -> None:
    if min(args.shape) < 32:
        raise UserInputError(f'--shape {args.shape}: both sides must be >= 32')
    if not osp.isfile(args.config):
        raise UserInputError(f'config not found: {args.config}')
    if str(args.checkpoint).lower() != 'none' and not osp.isfile(args.checkpoint):
        raise UserInputError(f'checkpoint not found: {args.checkpoint}')
    if osp.exists(args.out) and not args.force:
        raise UserInputError(f'{args.out} exists; pass --force to overwrite it')
    if args.int8 and args.backbone_only:
        raise UserInputError('--int8 quantises detector graphs (raw or --end2end), not '
                             '--backbone-only')


def main(argv=None) -> int:
    args = parse_args(argv)
    _check_args(args)
    from efficientvit_det.apis import init_detector
    no_weights = str(args.checkpoint).lower() == 'none'
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
    if args.int8:
        return _export_int8(args, model, shape, metadata)
    if args.end2end:
        return _export_end2end(args, model, shape, metadata)
    from efficientvit_det.deploy import DEFAULT_OPSET, export_onnx, other_verify_shape
    verify = [] if args.no_verify else [shape, other_verify_shape(shape)] + \
        [tuple(s) for s in args.verify_shape or ()]
    try:
        result = export_onnx(model, args.out, shape=shape, backbone_only=args.backbone_only,
                             opset=args.opset or DEFAULT_OPSET, batch_size=args.batch_size,
                             verify_shapes=verify, rel_tol=args.rel_tol or 1e-4,
                             metadata=metadata)
    except AssertionError as exc:
        return _verification_failed(args.out, exc)
    print(result.summary())
    _write_json(args.json, dict(path=result.path, mode=result.mode, input_name=result.input_name,
                                output_names=result.output_names,
                                export_shape=result.export_shape, opset=result.opset,
                                verification=result.verification))
    return 0


def _verification_failed(out: str, exc: Exception) -> int:
    if osp.exists(out):
        os.remove(out)
    print(f'error: verification failed, {out} removed: {exc}', file=sys.stderr)
    return 1


def _write_json(path, payload) -> None:
    if path:
        with open(path, 'w') as f:
            json.dump(payload, f, indent=1)


def _end2end_verify_images(args, shape):
    from efficientvit_det.deploy.end2end import synthetic_image
    if args.no_verify:
        return ()
    return [synthetic_image(shape, 1),
            synthetic_image((shape[0] * 3 // 4 + 5, shape[1] // 2 + 7), 2)] + \
        [synthetic_image(s, 3 + i) for i, s in enumerate(args.verify_shape or ())]


def _export_end2end(args: argparse.Namespace, model, shape, metadata) -> int:
    from efficientvit_det.deploy import DEFAULT_OPSET
    from efficientvit_det.deploy.end2end import export_end2end
    try:
        summary = export_end2end(model, args.out, model.cfg, shape=shape,
                                 opset=args.opset or DEFAULT_OPSET,
                                 verify_images=_end2end_verify_images(args, shape),
                                 rel_tol=args.rel_tol or 1e-3, metadata=metadata)
    except (TypeError, ValueError) as exc:  # an unsupported head or test_cfg
        raise UserInputError(str(exc)) from exc
    except AssertionError as exc:
        return _verification_failed(args.out, exc)
    print(f'wrote {summary["path"]} (end2end, opset {summary["opset"]}, traced at '
          f'{"x".join(map(str, summary["export_shape"]))}, dynamic height/width, batch 1)\n'
          f'  inputs  {", ".join(summary["input_names"])}\n'
          f'  outputs {", ".join(summary["output_names"])}')
    _print_end2end_verification(summary['verification'])
    _write_json(args.json, summary)
    return 0


def _print_end2end_verification(reports) -> None:
    for v in reports:
        print(f'  verified at {v["input_shape"]}: {v["num_dets"]} detections equal to mmdet\'s '
              f'(labels equal, max box rel err {v["max_box_rel_err"]:.1e}, max score err '
              f'{v["max_score_abs_err"]:.1e}; tolerance {v["rel_tol"]:.0e})')


def _export_int8(args: argparse.Namespace, model, shape, metadata) -> int:
    from efficientvit_det.cpu import cpu_info
    from efficientvit_det.deploy import DEFAULT_OPSET
    from efficientvit_det.deploy.quantize import calibration_images, export_int8
    if args.end2end:
        from efficientvit_det.deploy.end2end import DetectorEnd2End
        try:  # an unsupported head: say so before calibrating
            DetectorEnd2End(model)
        except (TypeError, ValueError) as exc:
            raise UserInputError(str(exc)) from exc
    images = calibration_images(model.cfg, args.calib, args.calib_images)
    source = (f"the config's {args.calib} split" if args.calib in ('train', 'val', 'test')
              else args.calib)
    print(f'calibration: {len(images)} images of {source}, through the test pipeline')
    if args.end2end and not args.no_verify and args.verify_shape:
        print('note: --verify-shape is not used with --int8 --end2end', file=sys.stderr)
    try:
        summary = export_int8(
            model, args.out, model.cfg, images, end2end=args.end2end, shape=shape,
            opset=args.opset or DEFAULT_OPSET, verify_float=not args.no_verify,
            metadata=metadata, keep_float=args.keep_float, op_types=args.int8_ops,
            calibrate_method=args.calib_method, reduce_range=args.reduce_range,
            calibration=f'{source} ({osp.basename(args.config)})')
    except AssertionError as exc:
        return _verification_failed(args.out, exc)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(str(exc)) from exc
    print(f'float graph verified against PyTorch ({summary["mode"]}); quantised:')
    print(summary['summary'])
    for c in summary['comparison']:
        line = (f'  int8 vs float at {c["input_shape"]}: {c["num_reference"]} float detections '
                f'>= {c["score_thr"]}, recall {c["recall"]:.2f}, precision {c["precision"]:.2f}')
        if c.get('mean_iou') is not None:
            line += f', mean IoU {c["mean_iou"]:.3f}, max score diff {c["max_score_diff"]:.3f}'
        if 'max_rel_rms' in c:
            line += f'; raw outputs rel RMS err <= {c["max_rel_rms"]:.3f} ({c["worst_output"]})'
        print(line)
    info = cpu_info()
    if not info.vnni:
        print(f'note: this CPU has no VNNI ({info.describe()}): int8 dot products run as AVX2 '
              'emulation here; measure what int8 gains on it with python -m benchmarks engines '
              '(docs/deploy.md)')
    print(f'accuracy on a whole split: python tools/test_onnx.py {args.config} {args.out} '
          f'--checkpoint {args.checkpoint}')
    _write_json(args.json, summary)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
