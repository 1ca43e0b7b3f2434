#!/usr/bin/env python
"""Evaluate exported ONNX graphs (float or int8, raw or end-to-end) with COCO AP, side by side
with the PyTorch model: the accuracy cost of a graph in one command.

    python tools/test_onnx.py CONFIG det_int8.onnx --checkpoint CHECKPOINT
    python tools/test_onnx.py CONFIG det.onnx det_int8.onnx --checkpoint CHECKPOINT --max-drop 1.0
    python tools/test_onnx.py CONFIG det_int8.onnx --engine openvino --max-images 500

The config's test dataloader (its test pipeline, batch size, dataset) feeds every batch through
the config's ``DetDataPreprocessor`` and then through each graph (``--engine``: onnxruntime, or
OpenVINO when installed) and, with ``--checkpoint``, through the PyTorch model in deploy mode at
``--precision`` (fp32 by default: the reference). Each one's detections are scored by the
config's ``test_evaluator`` (mmdet's CocoMetric), as ``tools/test.py`` does.

Prints a markdown table (bbox mAP, mAP_50, mAP_75, mAP_s/m/l, the difference in mAP points from
the first row, seconds per image) and writes ``--json``. ``--max-drop P`` exits with 1 when a
graph's bbox mAP is more than P points (0-100 scale) below the first row's.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import sys

from mmengine.config import DictAction

from efficientvit_det.cli import UserInputError, run_tool

KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', help='the config the graphs were exported from')
    p.add_argument('graphs', nargs='+', help='ONNX detector graphs (tools/export_onnx.py)')
    p.add_argument('--checkpoint', default=None,
                   help='also evaluate the PyTorch model of this checkpoint (the first row)')
    p.add_argument('--precision', choices=('fp32', 'auto', 'bf16'), default='fp32',
                   help='precision of the PyTorch model (default: %(default)s)')
    p.add_argument('--engine', choices=('ort', 'openvino'), default='ort',
                   help='what runs the graphs (default: onnxruntime)')
    p.add_argument('--threads', type=int, default=None, help='intra-op threads of the engine')
    p.add_argument('--max-images', type=int, default=None,
                   help='evaluate the first N images only (the metric scores those only)')
    p.add_argument('--max-drop', type=float, default=None, metavar='POINTS',
                   help='exit 1 when a graph loses more than POINTS of bbox mAP (x100) '
                        'against the first row')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                   help='override config entries, xxx=yyy format')
    p.add_argument('--json', metavar='FILE', default=None, help='write the results as JSON')
    return p.parse_args(argv)


def _row_name(path: str, precision: str, engine: str) -> str:
    return f'{osp.basename(path)} ({precision}, {engine})'


def format_table(headers, rows) -> str:
    """A markdown table (the tools cannot import the top-level benchmarks package)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'  # noqa: E731
    return '\n'.join([line(headers), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                      *(line(r) for r in rows)])


def main(argv=None) -> int:
    args = parse_args(argv)
    from efficientvit_det.apis import init_detector, load_config
    from efficientvit_det.cpu import cpu_info
    from efficientvit_det.deploy.runtime import GraphDetector, require_engine
    from efficientvit_det.inference.evaluate import TorchDetector, evaluate_detectors
    require_engine(args.engine)
    if args.max_images is not None and args.max_images < 1:
        raise UserInputError(f'--max-images must be >= 1, got {args.max_images}')
    for g in args.graphs:
        if not osp.isfile(g):
            raise FileNotFoundError(f'ONNX file not found: {g}')
    cfg = load_config(args.config, args.cfg_options)
    detectors = {}
    if args.checkpoint:
        model = init_detector(cfg, args.checkpoint)
        torch_det = TorchDetector(model, args.precision)
        detectors[f'PyTorch {osp.basename(args.checkpoint)} ({torch_det.precision})'] = torch_det
    for g in args.graphs:
        det = GraphDetector(cfg, g, args.engine, args.threads)
        detectors[_row_name(g, det.precision, args.engine)] = det
    if len(detectors) != len(args.graphs) + bool(args.checkpoint):
        raise UserInputError('the same graph is given twice')
    info = cpu_info()
    print(f'evaluating {len(detectors)} detector(s) on the test split of {args.config}; CPU: '
          f'{info.describe()}; VNNI: {"yes" if info.vnni else "no"}', flush=True)
    result = evaluate_detectors(cfg, detectors, args.max_images,
                                log=lambda s: print(s, flush=True))
    names = list(detectors)
    first = result['metrics'][names[0]]
    rows, failed = [], []
    for name in names:
        m = result['metrics'][name]
        drop = 100 * (first.get('coco/bbox_mAP', 0.) - m.get('coco/bbox_mAP', 0.))
        if args.max_drop is not None and name != names[0] and drop > args.max_drop:
            failed.append(name)
        # COCO gives -1 for a size class without objects: shown as '-'
        rows.append([name, *(f'{100 * m[f"coco/{k}"]:.1f}' if m.get(f'coco/{k}', -1) >= 0
                             else '-' for k in KEYS),
                     '-' if name == names[0] else f'{0. - drop:+.2f}',
                     f'{1e3 * result["seconds"][name] / max(result["num_images"], 1):.1f}'])
    print(format_table(['model', *(k.replace('bbox_', '') for k in KEYS),
                        'mAP vs 1st row (points)', 'ms / image'], rows))
    print(f'{result["num_images"]} images; COCO bbox AP x100 (mmdet CocoMetric); ms / image: '
          f'the model alone after the data preprocessor, post-processing included')
    if args.json:
        payload = dict(config=args.config, checkpoint=args.checkpoint, graphs=args.graphs,
                       engine=args.engine, cpu=info.describe(), vnni=info.vnni, **result)
        with open(args.json, 'w') as f:
            json.dump(payload, f, indent=1)
    if failed:
        print(f'error: bbox mAP drops by more than {args.max_drop} points: '
              f'{", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
