"""CPU inference engines side by side on the same weights: PyTorch, the project's default,
onnxruntime and OpenVINO, in float and int8, per image end to end and network only.

    python -m benchmarks engines                          # RetinaNet-M4, an 800x1333 image
    python -m benchmarks engines --rows pytorch-fp32 default ort-fp32 ort-int8 --repeats 3
    python -m benchmarks engines --config CONFIG --checkpoint CKPT --calib train --shape 128 128

Rows (``--rows``; all by default):

``pytorch-fp32``      the detector as built, eval mode, float32 (``mmdet.apis.inference_detector``)
``default``           the project's default inference form, exactly what ``tools/infer.py`` runs:
                      ``prepare_inference(model, 'auto', deploy=True)`` (deploy mode; bf16 autocast
                      + channels_last on CPUs with native bf16, fp32 elsewhere)
``ort-fp32``          the exported raw-head graph (``export_onnx``) on onnxruntime's CPU provider
``openvino-fp32``     that graph on OpenVINO's CPU plugin, ``INFERENCE_PRECISION_HINT f32``
``openvino-default``  that graph on OpenVINO with its own default hint (bf16 on CPUs with
                      AVX512-BF16/AMX, f32 elsewhere)
``ort-int8``          the graph quantised by ``tools/export_onnx.py --int8``'s code
                      (:func:`efficientvit_det.deploy.quantize.quantize_graph`: QDQ, per-channel
                      int8 weights, uint8 activations, the default float groups) on onnxruntime
``openvino-int8``     the same int8 graph on OpenVINO

OpenVINO rows are skipped, with the reason in the table, when ``openvino`` is not installed.

*End to end* is the whole per-image cost from an in-memory uint8 image: the config's test
pipeline and data preprocessor, the network, and mmdet's post-processing (``predict_by_feat``:
decoding, score threshold, NMS, rescale), the same code for every row. *Network* is the
network alone on the preprocessed input (the graph's run, or backbone + neck + head in
PyTorch). Everything is timed interleaved in one process (``benchmarks.common.time_interleaved``)
on the same number of threads; the table gives medians (interquartile range) and speed-ups over
PyTorch fp32 and over the project's default.

Weights: random by default (as ``python -m benchmarks detector``: every parameter randomised,
BatchNorm statistics calibrated, classification bias at the focal-loss prior so post-processing
sees realistic candidate counts), and the int8 graph is calibrated on ``--calib-images``
synthetic images; with ``--checkpoint`` the trained weights and ``--calib`` (a split of the
config or a folder). Every row's detections are compared with PyTorch fp32's
(:func:`efficientvit_det.deploy.quantize.detection_agreement`).

The CPU's line (:func:`efficientvit_det.cpu.cpu_info`) and whether it has VNNI (int8 dot
products in hardware: AVX512-VNNI, AVX-VNNI or AMX-INT8) are printed under the table: without
VNNI, onnxruntime and OpenVINO emulate int8 dot products with AVX2 instructions.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from benchmarks.common import (
    Progress,
    add_common_args,
    fmt_ms,
    format_table,
    report,
    resolve_detector_config,
    setup_from_args,
    time_interleaved,
)
from efficientvit_det.cpu import cpu_info

ROWS = {
    'pytorch-fp32': 'PyTorch fp32 (eval)',
    'default': "project default (tools/infer.py)",
    'ort-fp32': 'onnxruntime fp32',
    'openvino-fp32': 'OpenVINO fp32',
    'openvino-default': 'OpenVINO default hint',
    'ort-int8': 'onnxruntime int8',
    'openvino-int8': 'OpenVINO int8',
}
OPENVINO_ROWS = ('openvino-fp32', 'openvino-default', 'openvino-int8')
INT8_ROWS = ('ort-int8', 'openvino-int8')


def build_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='python -m benchmarks engines',
                                               description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='m4',
                        help='m0..m5 (our RetinaNet COCO configs) or a config path (default: m4)')
    parser.add_argument('--checkpoint', default=None,
                        help='trained weights (default: random, as the detector benchmark)')
    parser.add_argument('--rows', nargs='+', choices=list(ROWS), default=list(ROWS),
                        help='engines to time (default: all)')
    parser.add_argument('--shape', nargs=2, type=int, default=(800, 1333), metavar=('H', 'W'),
                        help='the in-memory image (default: %(default)s; the COCO test pipeline '
                             'keeps 800x1333, padded to 800x1344)')
    parser.add_argument('--calib', default=None,
                        help="int8 calibration: the config's train/val/test split or a folder "
                             '(default: synthetic images, or train with --checkpoint)')
    parser.add_argument('--calib-images', type=int, default=4,
                        help='int8 calibration images (default: %(default)s)')
    parser.add_argument('--keep-float', nargs='*', default=None, metavar='GROUP',
                        help='int8: groups kept in float (default: the export default)')
    parser.add_argument('--no-network', action='store_true',
                        help='time end to end only (not the network alone)')
    parser.add_argument('--onnx-dir', default=None,
                        help='keep the exported graphs here (default: a temporary folder)')
    add_common_args(parser, repeats=3, warmup=1)
    return parser


def _synthetic_images(hw: Sequence[int], n: int, seed: int) -> List[np.ndarray]:
    from efficientvit_det.deploy.end2end import synthetic_image
    return [synthetic_image(hw, seed + 1000 + i) for i in range(n)]


class _Rows:
    """Everything timed, built once: per row an end-to-end and a network-only callable."""

    def __init__(self, args: argparse.Namespace, progress: Progress, onnx_dir: str):
        from benchmarks.detector import InferenceCases, build_model
        from efficientvit_det.inference import resolve_precision
        self.args, self.progress = args, progress
        device = torch.device('cpu')
        h, w = args.shape
        self.img = np.random.default_rng(args.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        config = resolve_detector_config(args.config)
        self.weights = 'random (BN calibrated, focal-loss prior bias)'
        cache: dict = {}

        def torch_model(flags: str):
            if args.checkpoint is None:
                return build_model(config + flags, device, args.seed, cache=cache)
            from efficientvit_det.apis import init_detector
            from efficientvit_det.inference import prepare_inference
            model = init_detector(config, args.checkpoint)
            if flags == '+auto':
                return model, prepare_inference(model, 'auto', deploy=True, log=False)
            if flags == '+deploy':
                return model, prepare_inference(model, 'fp32', deploy=True, log=False)
            return model, resolve_precision('fp32', device)

        if args.checkpoint is not None:
            self.weights = os.path.basename(args.checkpoint)
        progress.update('[engines] building the PyTorch models', force=True)
        self.e2e: Dict[str, Callable[[], Any]] = {}
        self.net: Dict[str, Callable[[], Any]] = {}
        self.skipped: Dict[str, str] = {}
        self.cases: Dict[str, Any] = {}
        rows = args.rows
        eval_model, fp32 = torch_model('')
        self.reference = InferenceCases(eval_model, self.img, None, fp32)
        self.cfg = eval_model.cfg
        self.default_precision = None
        if 'pytorch-fp32' in rows:
            self._add_torch('pytorch-fp32', self.reference)
        if 'default' in rows:
            model, precision = torch_model('+auto')
            self.default_precision = precision.summary()
            self._add_torch('default', InferenceCases(model, self.img, None, precision))
        self.graphs: Dict[str, str] = {}
        if any(r not in ('pytorch-fp32', 'default') for r in rows):
            deploy_model, _ = torch_model('+deploy')
            self._export(deploy_model, onnx_dir)
            self._add_graph_rows(rows)

    def _add_torch(self, row: str, ic) -> None:
        model, amp = ic.model, ic.amp

        def network():
            with torch.inference_mode(), amp():
                return model.bbox_head(model.neck(model.backbone(ic.inputs)))

        self.cases[row] = ic
        self.e2e[row] = ic.e2e
        self.net[row] = network

    def _export(self, model, onnx_dir: str) -> None:
        from efficientvit_det.deploy import export_onnx
        from efficientvit_det.deploy.quantize import (
            DEFAULT_KEEP_FLOAT,
            calibration_images,
            quantize_graph,
        )
        args = self.args
        inputs = self.reference.inputs
        shape = tuple(inputs.shape[2:])
        self.graphs['fp32'] = os.path.join(onnx_dir, 'detector_fp32.onnx')
        self.progress.update(f'[engines] exporting the graph at {shape[0]}x{shape[1]}', force=True)
        export_onnx(model, self.graphs['fp32'], shape=shape, verify_shapes=())
        if not any(r in INT8_ROWS for r in args.rows):
            return
        calib = args.calib or ('train' if args.checkpoint else None)
        if calib is None:
            images = _synthetic_images(args.shape, args.calib_images, args.seed)
            self.calibration = f'{len(images)} synthetic images of {args.shape[0]}x{args.shape[1]}'
        else:
            images = calibration_images(self.cfg, calib, args.calib_images)
            self.calibration = f'{len(images)} images of {calib}'
        keep = DEFAULT_KEEP_FLOAT if args.keep_float is None else args.keep_float
        self.graphs['int8'] = os.path.join(onnx_dir, 'detector_int8.onnx')
        self.progress.update(f'[engines] quantising ({self.calibration})', force=True)
        self.quantization = quantize_graph(self.graphs['fp32'], self.graphs['int8'], self.cfg,
                                           images, keep_float=keep, calibration=self.calibration)

    def _add_graph_rows(self, rows: Sequence[str]) -> None:
        from efficientvit_det.deploy.runtime import GraphDetector, openvino_available
        threads = torch.get_num_threads()
        ic = self.reference
        for row in rows:
            if row in ('pytorch-fp32', 'default'):
                continue
            if row in OPENVINO_ROWS and not openvino_available():
                self.skipped[row] = 'OpenVINO not installed (pip install openvino)'
                continue
            engine = 'openvino' if row.startswith('openvino') else 'ort'
            graph = self.graphs['int8' if row in INT8_ROWS else 'fp32']
            hint = 'f32' if row == 'openvino-fp32' else 'default'
            self.progress.update(f'[engines] compiling {row}', force=True)
            det = GraphDetector(self.cfg, graph, engine, threads, spinning=False,
                                openvino_hint=hint)
            self.cases[row] = det

            def e2e(det=det):
                batch = ic.pre()
                return det.predict(batch['inputs'], batch['data_samples'])

            def network(det=det):
                return det.network(ic.inputs, ic.batch['data_samples'])

            self.e2e[row] = e2e
            self.net[row] = network

    def detections(self, row: str):
        out = self.e2e[row]()
        if row in ('pytorch-fp32', 'default'):
            return out.pred_instances
        return out[0]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from efficientvit_det.deploy.quantize import detection_agreement
    from efficientvit_det.deploy.runtime import openvino_version
    progress = Progress(enabled=not args.quiet)
    tmp = None
    onnx_dir = args.onnx_dir
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix='engines_')
        onnx_dir = tmp.name
    os.makedirs(onnx_dir, exist_ok=True)
    try:
        rows = _Rows(args, progress, onnx_dir)
        timed = [r for r in args.rows if r in rows.e2e]
        cases = {f'{r} e2e': rows.e2e[r] for r in timed}
        if not args.no_network:
            cases.update({f'{r} network': rows.net[r] for r in timed})
        reference = rows.detections('pytorch-fp32') if 'pytorch-fp32' in timed \
            else rows.reference.e2e().pred_instances
        checks = {r: detection_agreement(reference, rows.detections(r), score_thr=0.3)
                  for r in timed}
        heaviest = 'pytorch-fp32 e2e' if 'pytorch-fp32 e2e' in cases else next(iter(cases))
        stats = time_interleaved(cases, args.repeats, args.warmup, torch.device('cpu'), progress,
                                 label='engines', allocator_warmup=cases[heaviest])
        progress.done()
        quant = getattr(rows, 'quantization', None)
        input_shape = list(rows.reference.inputs.shape)
    finally:
        if tmp is not None:
            tmp.cleanup()
    results = []
    for r in args.rows:
        if r in rows.skipped:
            results.append(dict(row=r, label=ROWS[r], skipped=rows.skipped[r]))
            continue
        entry = dict(row=r, label=ROWS[r], e2e=stats[f'{r} e2e'],
                     network=stats.get(f'{r} network'), agreement=checks[r],
                     precision=_precision(r, rows))
        case = rows.cases[r]
        if hasattr(case, 'runner'):
            entry['engine'] = case.runner.description
        results.append(entry)
    for base in ('pytorch-fp32', 'default'):
        ref = next((x for x in results if x['row'] == base and 'e2e' in x), None)
        if ref is None:
            continue
        for x in results:
            if 'e2e' not in x:
                continue
            x[f'e2e_speedup_vs_{base}'] = ref['e2e']['median_ms'] / x['e2e']['median_ms']
            if x.get('network') and ref.get('network'):
                x[f'network_speedup_vs_{base}'] = (ref['network']['median_ms']
                                                   / x['network']['median_ms'])
    info = cpu_info()
    import onnxruntime
    return dict(benchmark='engines', config=args.config, weights=rows.weights,
                image_hw=list(args.shape), input_shape=input_shape, results=results,
                cpu=info.describe(), vnni=info.vnni,
                default_precision=rows.default_precision,
                calibration=getattr(rows, 'calibration', None),
                quantization=quant.as_dict() if quant is not None else None,
                threads=torch.get_num_threads(), onnxruntime=onnxruntime.__version__,
                openvino=openvino_version(), onnx_dir=args.onnx_dir)


def _precision(row: str, rows: '_Rows') -> str:
    if row == 'default':
        return rows.cases[row].precision.name + ' + deploy'
    if row in INT8_ROWS:
        return 'int8 (QDQ)'
    if row == 'openvino-default':
        return rows.cases[row].runner.description.split('HINT ')[-1].split(' ')[0]
    return 'fp32'


def render(payload: Dict[str, Any]) -> str:
    rows = []
    for r in payload['results']:
        if 'skipped' in r:
            rows.append([r['label'], '-', f"skipped: {r['skipped']}", *['-'] * 6])
            continue
        a = r['agreement']
        net = r.get('network')
        rows.append([
            r['label'], r['precision'], fmt_ms(r['e2e']), fmt_ms(net) if net else '-',
            _x(r.get('e2e_speedup_vs_pytorch-fp32')), _x(r.get('e2e_speedup_vs_default')),
            _x(r.get('network_speedup_vs_default')), a['num_candidate'],
            f"{a['recall']:.2f} / {a['precision']:.2f}"])
    table = format_table(['engine', 'precision', 'end-to-end ms: median (IQR)', 'network ms',
                          'e2e vs PyTorch fp32', 'e2e vs default', 'network vs default',
                          'dets >= 0.3', 'recall / precision vs PyTorch fp32'], rows)
    h, w = payload['image_hw']
    lines = [table,
             f"RetinaNet {payload['config']}, weights: {payload['weights']}; image {h}x{w} "
             f"uint8 in memory -> network input {'x'.join(map(str, payload['input_shape']))}; "
             f"{payload['threads']} threads; onnxruntime {payload['onnxruntime']}, OpenVINO "
             f"{payload['openvino'] or 'not installed'}",
             f"CPU: {payload['cpu']}; VNNI (int8 dot products in hardware): "
             f"{'yes' if payload['vnni'] else 'NO'}"]
    if payload.get('default_precision'):
        lines.append(f"project default: {payload['default_precision']}")
    if payload.get('quantization'):
        q = payload['quantization']
        lines.append(f"int8: calibrated on {payload['calibration']}; float groups: "
                     f"{', '.join(q['keep_float']) or 'none'}; int8 nodes: "
                     f"{', '.join(f'{n} {t}' for t, n in sorted(q['quantized_nodes'].items()))}")
    if payload['weights'].startswith('random'):
        lines.append('recall / precision: with random weights many detections nearly tie, so '
                     'even float rounding (the fp32 rows) reorders them; judge accuracy on '
                     'trained weights with tools/test_onnx.py')
    if not payload['vnni'] and any(r['row'] in INT8_ROWS for r in payload['results']):
        lines.append('note: this CPU has no VNNI, so the int8 rows run int8 dot products '
                     'emulated with AVX2 (vpmaddubsw); int8 speed on a VNNI CPU cannot be '
                     'judged from this table')
    return '\n'.join(lines)


def _x(v: Optional[float]) -> str:
    return f'{v:.2f}x' if v is not None else '-'


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.device == 'auto':
        args.device = 'cpu'  # CPU engines
    device = setup_from_args(args)
    if device.type != 'cpu':
        raise SystemExit('python -m benchmarks engines: a CPU benchmark; pass --device cpu')
    if 'pytorch-fp32' not in args.rows:
        args.rows = ['pytorch-fp32', *args.rows]  # the reference of every comparison
    payload = run(args)
    return report(payload, args, device, render)


if __name__ == '__main__':
    main()
