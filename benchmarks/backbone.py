"""Backbone latency / throughput: our EfficientViT next to timm's eager model, same weights.

    python -m benchmarks backbone --arch m4 --inputs 1x224x224 16x224x224 1x800x1344

Variants (``--variants``; a ``+cl`` suffix runs that variant in channels_last):

``timm``       timm's ``efficientvit_<arch>`` built at 448 px so every stage uses 7x7 windows,
               exactly like the original detection code (it pads/partitions any input the same
               way), eager PyTorch, our randomised weights copied in; the three stage outputs.
``module``     ours, ``attn_backend='module'`` (the original's module path).
``fused``      ours, ``attn_backend='fused'``: the fused cascaded-group-attention op (its ``auto``
               backend: the C++ kernel on CPU when built, Triton on CUDA, else its PyTorch
               reference -- the backend used is reported).
``deploy``     ``fused`` in deploy mode (``efficientvit_det.deploy.deploy_model``: every Conv+BN
               folded, conv+ReLU merged, as the inference form runs it).
``onnx``       ``deploy`` exported to ONNX (``efficientvit_det.deploy.export_onnx``, dynamic
               size) and run by onnxruntime's CPU provider on as many threads as torch uses
               (CPU only; no ``+cl``: onnxruntime picks its own layouts).

Before timing, every variant's outputs are compared with the first variant's (timm by
default) on the same input: ``max_rel_err`` = max |a - e| / max |e| over the three stages.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from benchmarks.common import (
    Progress,
    add_common_args,
    fmt_ms,
    format_table,
    report,
    setup_from_args,
    time_interleaved,
)
from efficientvit_det.deploy import deploy_model
from efficientvit_det.testing import calibrate_bn_, max_rel_err, randomize_

BASE_VARIANTS = ('timm', 'module', 'fused', 'deploy', 'onnx')
DEFAULT_VARIANTS = ('timm', 'module', 'fused', 'deploy', 'deploy+cl', 'onnx')
DEFAULT_INPUTS = ('1x224x224', '16x224x224', '1x800x1344')


class TimmStages(nn.Module):
    """timm EfficientVitMsra -> its three stage outputs (what a detector consumes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.model.patch_embed(x)
        outs = []
        for stage in self.model.stages:
            x = stage(x)
            outs.append(x)
        return tuple(outs)


def parse_input(spec: str) -> Tuple[int, int, int]:
    """'16x224x224' -> (16, 224, 224) (batch x height x width)."""
    try:
        b, h, w = (int(v) for v in spec.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'input {spec!r}: expected BATCHxHEIGHTxWIDTH, e.g. 1x800x1344') from None
    if min(b, h, w) < 1:
        raise argparse.ArgumentTypeError(f'input {spec!r}: sizes must be positive')
    return b, h, w


def parse_variant(spec: str) -> Tuple[str, bool]:
    base, _, suffix = spec.partition('+')
    if base not in BASE_VARIANTS or suffix not in ('', 'cl') or (base == 'onnx' and suffix):
        raise argparse.ArgumentTypeError(
            f'variant {spec!r}: choose from {BASE_VARIANTS}, optionally with +cl (channels_last; '
            f'not for onnx)')
    return base, suffix == 'cl'


class OnnxRuntimeBackbone(nn.Module):
    """A backbone exported to ONNX and run by onnxruntime (CPU), called like the module."""

    def __init__(self, backbone: nn.Module, threads: int):
        super().__init__()
        import tempfile

        from efficientvit_det.deploy import export_onnx, make_session
        with tempfile.TemporaryDirectory(prefix='evit_backbone_') as tmp:
            path = f'{tmp}/backbone.onnx'
            export_onnx(backbone, path, shape=(224, 224), backbone_only=True, verify_shapes=())
            # no spinning: idle ORT threads would busy-wait and slow the variants timed after it
            self.session = make_session(path, threads=threads, spinning=False)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        outs = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def timm_window_img_size(arch_settings: dict) -> int:
    """img_size for timm so that every stage's feature map is >= 7 (7x7 windows everywhere)."""
    ws = arch_settings.get('window_size', 7)
    return 64 * ws  # stage 3 is at stride 64


def build_variants(arch: str, variants: Sequence[str], device: torch.device, seed: int = 0
                   ) -> Dict[str, nn.Module]:
    """All requested variants, eval mode, sharing one set of randomised weights."""
    from efficientvit_det.models.backbones.efficientvit import EfficientViT

    ref = randomize_(EfficientViT(arch, attn_backend='module'), seed)
    calib = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed + 100))
    calibrate_bn_(ref, lambda: ref(calib))
    state = ref.state_dict()
    models: Dict[str, nn.Module] = {}
    for spec in variants:
        base, cl = parse_variant(spec)
        if base == 'timm':
            import timm
            t = timm.create_model(f'efficientvit_{arch}', img_size=timm_window_img_size(ref.arch),
                                  num_classes=0)
            missing, unexpected = t.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f'timm efficientvit_{arch} does not take our weights: missing '
                                   f'{missing[:5]}, unexpected {unexpected[:5]}')
            m = TimmStages(t)
        elif base == 'module':
            m = copy.deepcopy(ref)
        else:
            m = EfficientViT(arch, attn_backend='fused')
            m.load_state_dict(state)
            if base in ('deploy', 'onnx'):
                deploy_model(m)
            if base == 'onnx':
                models[spec] = OnnxRuntimeBackbone(m.eval(), torch.get_num_threads())
                continue
        m = m.eval().to(device)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        models[spec] = m
    return models


def cga_backend_in_use(device: torch.device) -> str:
    try:
        from efficientvit_det.ops import resolve_backend
        return resolve_backend('auto', torch.empty(1, 1, 1, 1, device=device))
    except Exception as exc:  # noqa: BLE001
        return f'unavailable ({exc})'


def run(arch: str = 'm4', inputs: Sequence[Tuple[int, int, int]] = (), variants: Sequence[str] = DEFAULT_VARIANTS,
        device: torch.device = torch.device('cpu'), repeats: int = 10, warmup: int = 2,
        seed: int = 0, tol: float = 1e-3, progress: Optional[Progress] = None) -> Dict[str, Any]:
    inputs = list(inputs) or [parse_input(s) for s in DEFAULT_INPUTS]
    progress = progress or Progress(enabled=False)
    progress.update(f'[backbone] building {len(variants)} variants of {arch}', force=True)
    models = build_variants(arch, variants, device, seed)
    baseline = variants[0]
    gen = torch.Generator().manual_seed(seed + 1)

    def make_input(b, h, w, cl):
        x = torch.randn(b, 3, h, w, generator=gen).to(device)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    # Warm the allocator once with the largest input through every variant (docs/facts.md, "Measuring").
    largest = max(inputs, key=lambda s: s[0] * s[1] * s[2])
    xl = make_input(*largest, False)

    with torch.inference_mode():
        for spec, m in models.items():
            progress.update(f'[backbone] allocator warm-up: {spec} {largest}', force=True)
            m(xl.contiguous(memory_format=torch.channels_last) if parse_variant(spec)[1] else xl)
    del xl

    results: List[Dict[str, Any]] = []
    for (b, h, w) in inputs:
        x = make_input(b, h, w, False)
        xcl = x.contiguous(memory_format=torch.channels_last)
        feeds = {spec: (xcl if parse_variant(spec)[1] else x) for spec in variants}
        with torch.inference_mode():
            outs = {spec: models[spec](feeds[spec]) for spec in variants}
        errs = {spec: max_rel_err(outs[spec], outs[baseline]) for spec in variants}
        shapes = [list(t.shape) for t in outs[baseline]]
        del outs

        def case(spec, feeds=feeds):
            m, inp = models[spec], feeds[spec]

            def fn():
                with torch.inference_mode():
                    m(inp)
            return fn

        stats = time_interleaved({spec: case(spec) for spec in variants}, repeats, warmup, device,
                                 progress, label=f'backbone {b}x{h}x{w}')
        base_ms = stats[baseline]['median_ms']
        for spec in variants:
            s = stats[spec]
            results.append(dict(
                input=f'{b}x{h}x{w}', batch=b, height=h, width=w, variant=spec,
                channels_last=parse_variant(spec)[1], **{k: v for k, v in s.items()},
                imgs_per_s=b / (s['median_ms'] / 1e3),
                speedup_vs_baseline=base_ms / s['median_ms'],
                max_rel_err_vs_baseline=errs[spec], outputs_equal=errs[spec] <= tol,
                output_shapes=shapes))
    progress.done()
    fastest = {}
    for r in results:
        if r['variant'] != baseline:
            cur = fastest.get(r['input'])
            if cur is None or r['median_ms'] < cur['median_ms']:
                fastest[r['input']] = r
    return dict(
        benchmark='backbone', arch=arch, baseline=baseline, tolerance=tol,
        cga_backend=cga_backend_in_use(device), variants=list(variants), results=results,
        all_outputs_equal=all(r['outputs_equal'] for r in results),
        fastest=[dict(input=k, variant=v['variant'], median_ms=v['median_ms'],
                      speedup_vs_baseline=v['speedup_vs_baseline']) for k, v in fastest.items()])


def render(payload: Dict[str, Any]) -> str:
    base = payload['baseline']
    rows = [(r['input'], r['variant'], fmt_ms(r), f"{r['imgs_per_s']:.1f}",
             f"{r['speedup_vs_baseline']:.2f}x", f"{r['max_rel_err_vs_baseline']:.1e}")
            for r in payload['results']]
    table = format_table(['input (BxHxW)', 'variant', 'latency ms: median (IQR)', 'img/s',
                          f'speed-up vs {base}', f'max rel err vs {base}'], rows)
    notes = [f"arch {payload['arch']}; fused attention backend: {payload['cga_backend']}; "
             f"outputs equal (<= {payload['tolerance']:g}): {payload['all_outputs_equal']}"]
    for f in payload['fastest']:
        notes.append(f"fastest at {f['input']}: {f['variant']} {f['median_ms']:.2f} ms, "
                     f"{f['speedup_vs_baseline']:.2f}x vs {base}")
    return table + '\n' + '\n'.join(notes)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='python -m benchmarks backbone', description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='m4')
    parser.add_argument('--inputs', nargs='+', type=parse_input, default=None, metavar='BxHxW',
                        help=f'default: {" ".join(DEFAULT_INPUTS)}')
    parser.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS),
                        help=f'from {BASE_VARIANTS}, each optionally +cl (channels_last); the '
                             f'first is the baseline (default: %(default)s)')
    parser.add_argument('--channels-last', action='store_true',
                        help='run every variant in channels_last (adds +cl to each)')
    parser.add_argument('--tol', type=float, default=1e-3,
                        help='max relative error for outputs to count as equal (default: %(default)s)')
    add_common_args(parser, repeats=10, warmup=2)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup_from_args(args)
    variants = list(dict.fromkeys(
        (v if v.endswith('+cl') else v + '+cl') if args.channels_last else v for v in args.variants))
    for v in variants:
        try:
            parse_variant(v)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(str(e)) from None
    if device.type != 'cpu' and 'onnx' in variants:  # onnxruntime runs on the CPU here
        print('note: the onnx variant is CPU-only; left out on', device, file=sys.stderr)
        variants.remove('onnx')
    payload = run(args.arch, args.inputs or [], variants, device, args.repeats, args.warmup,
                  args.seed, args.tol, Progress(not args.quiet))
    return report(payload, args, device, render)


if __name__ == '__main__':
    main()
