"""CPU latency: onnxruntime vs PyTorch eager on the deploy-mode (Conv+BN folded) model.

    python -m benchmarks onnx --json work_dirs/onnx_latency.json

For each part (``backbone``: EfficientViT alone; ``detector``: RetinaNet up to its raw head
outputs, i.e. backbone + EfficientViTFPN + RetinaHead convolutions, no decoding/NMS) it times,
interleaved in one process (``benchmarks.common.time_interleaved``: allocator warm-up with the
largest case, untimed warm-up passes, rotating order, median and quartiles of the repeats):

* ``torch (fused op)``: PyTorch eager, Conv+BN folded, attention through the fused CGA op
  (``attn_backend='auto'``: the C++ CPU extension when built, else the PyTorch reference);
* ``torch (reference)``: PyTorch eager, Conv+BN folded, attention through the plain PyTorch
  window path (pad, partition, cascaded group attention, reverse): the computation the ONNX
  graph contains;
* ``onnxruntime``: the graph exported by :func:`efficientvit_det.deploy.export_onnx`, CPU
  execution provider, all graph optimisations, as many intra-op threads as torch uses.

The model is built from ``--config`` (m4 RetinaNet by default) with random weights: latency
does not depend on the values (checked outputs are only compared by shape here; accuracy is
tested in tests/test_onnx_export.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.common import (
    Progress,
    fmt_ms,
    format_table,
    machine_info,
    time_interleaved,
    write_json,
)
from efficientvit_det.testing import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'retinanet_efficientvit_m4_coco.py')
PARTS = ('backbone', 'detector')
CASES = ('torch (fused op)', 'torch (reference)', 'onnxruntime')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=DEFAULT_CONFIG, help='model config (default: RetinaNet m4)')
    p.add_argument('--shape', type=int, nargs=2, default=(800, 1344), metavar=('H', 'W'),
                   help='input size (default: %(default)s)')
    p.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
    p.add_argument('--repeats', type=int, default=10, help='timed repeats per case (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=2, help='untimed passes per case (default: %(default)s)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch and onnxruntime intra-op threads (default: torch default)')
    p.add_argument('--opset', type=int, default=None, help='ONNX opset (default: the exporter default)')
    p.add_argument('--onnx-dir', default=None, help='keep the exported graphs here (default: a temp dir)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', metavar='FILE', default=None, help='also write the results as JSON')
    p.add_argument('--quiet', action='store_true', help='no progress line on stderr')
    return p.parse_args(argv)


def _shapes(outs) -> List[tuple]:
    return [tuple(o.shape) for o in outs]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from efficientvit_det.apis import init_detector
    from efficientvit_det.deploy import (
        DEFAULT_OPSET,
        BackboneOutputs,
        DetectorRawOutputs,
        deploy_model,
        export_onnx,
        make_session,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    progress = Progress(enabled=not args.quiet)
    h, w = args.shape

    progress.update('building the model', force=True)
    model = init_detector(args.config)
    randomize_(model, args.seed)
    fused_op = deploy_model(model)  # attn_backend as configured ('auto')
    reference = copy.deepcopy(fused_op)
    reference.backbone.set_attn_backend('reference')
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(args.seed))

    tmp = None
    onnx_dir = args.onnx_dir
    if onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix='onnx_latency_')
        onnx_dir = tmp.name
    os.makedirs(onnx_dir, exist_ok=True)
    results: Dict[str, Any] = {}
    try:
        wrappers = {}
        for part in args.parts:
            wrap = BackboneOutputs if part == 'backbone' else DetectorRawOutputs
            path = os.path.join(onnx_dir, f'{part}.onnx')
            progress.update(f'[{part}] exporting to ONNX', force=True)
            export_onnx(fused_op, path, shape=(h, w), backbone_only=part == 'backbone',
                        opset=args.opset or DEFAULT_OPSET, verify_shapes=())
            sess = make_session(path, threads=threads, spinning=False)  # no busy-waiting between cases
            feed = {sess.get_inputs()[0].name: x.numpy()}
            modules = {CASES[0]: wrap(fused_op.backbone if part == 'backbone' else fused_op),
                       CASES[1]: wrap(reference.backbone if part == 'backbone' else reference)}
            wrappers[part] = (modules, sess, feed, path)

        def torch_call(mod):
            def call():
                with torch.inference_mode():
                    return mod(x)
            return call

        def ort_call(sess, feed):
            return lambda: sess.run(None, feed)

        # allocator warm-up: one pass of the largest case before anything is timed
        largest = wrappers.get('detector', wrappers.get('backbone'))
        warm = torch_call(largest[0][CASES[1]])

        for part in args.parts:
            modules, sess, feed, path = wrappers[part]
            cases = {CASES[0]: torch_call(modules[CASES[0]]),
                     CASES[1]: torch_call(modules[CASES[1]]),
                     CASES[2]: ort_call(sess, feed)}
            shapes = {n: _shapes(c()) for n, c in cases.items()}
            if len({tuple(s) for s in shapes.values()}) != 1:
                raise RuntimeError(f'[{part}] the cases disagree on output shapes: {shapes}')
            stats = time_interleaved(cases, args.repeats, args.warmup, torch.device('cpu'),
                                     progress, label=part, allocator_warmup=warm)
            results[part] = dict(stats=stats, output_shapes=shapes[CASES[2]],
                                 onnx_file=path if args.onnx_dir else None,
                                 onnx_mb=round(os.path.getsize(path) / 2**20, 2))
            warm = None
        progress.done()
    finally:
        if tmp is not None:
            tmp.cleanup()

    import onnxruntime
    info = machine_info(torch.device('cpu'))
    info.update(onnxruntime=onnxruntime.__version__, threads=threads)
    try:
        info['load_avg_at_end'] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    backbone_cfg = model.cfg.model.backbone
    return dict(config=os.path.relpath(args.config, ROOT) if args.config.startswith(ROOT) else args.config,
                arch=backbone_cfg.get('arch'), input=f'1x3x{h}x{w}', repeats=args.repeats,
                warmup=args.warmup, machine=info, results=results)


def format_results(payload: Dict[str, Any]) -> str:
    rows = []
    for part, res in payload['results'].items():
        st = res['stats']
        best_torch = min(st[CASES[0]]['median_ms'], st[CASES[1]]['median_ms'])
        rows.append([part, payload['input'], *(fmt_ms(st[c]) for c in CASES),
                     f"{best_torch / st[CASES[2]]['median_ms']:.2f}x"])
    headers = ['part', 'input', *(f'{c} ms' for c in CASES), 'onnxruntime speed-up vs best torch']
    m = payload['machine']
    note = (f"{payload['config']} ({payload['arch']}), median (quartiles) of {payload['repeats']} "
            f"interleaved repeats; {m['cpu']}, {m['cpu_count']} CPUs, {m['threads']} threads; "
            f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; CGA CPU extension: "
            f"{m.get('cga_cpu_extension')}; load average at start/end: "
            f"{m.get('load_avg_at_start')}/{m.get('load_avg_at_end')}")
    return format_table(headers, rows) + '\n' + note


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit('--repeats must be >= 1 and --warmup >= 0')
    payload = run(args)
    payload['command'] = 'python -m benchmarks onnx ' + ' '.join(
        sys.argv[1:] if argv is None else list(argv))
    print(format_results(payload))
    write_json(args.json, payload)
    return 0


if __name__ == '__main__':
    sys.exit(main())
