"""Benchmark of the windowed cascaded group attention at detection resolution.

Competitors, all on the same (BN-folded) weights:

* ``timm``      timm's ``LocalWindowAttention`` (pads, partitions into 7x7 windows and reverses
                exactly like the original detection code), BatchNorms in eval mode;
* ``reference`` :func:`efficientvit_det.ops.cga_reference.cga_reference` (plain PyTorch);
* ``fused``     :func:`efficientvit_det.ops.cascaded_group_attention` with the C++ (CPU) or Triton
                (CUDA) backend;
* ``compiled``  ``torch.compile(cga_reference)`` (skipped with ``--no-compile``).

Shapes: m4's three stages for an 800x1344 image (C=128 @ 50x84, 256 @ 25x42, 384 @ 13x21; 4 heads,
kernels 7,5,3,3, key_dim 16). Modes: forward (no grad) and forward+backward (grads of x and of
all weights). Timing follows docs/facts.md "Measuring": allocator warmed by a large pass first,
competitors interleaved in one process, median of repeats with quartiles.

FLOPs are the nominal count of the original computation (every padded token, the real dw kernel
sizes: m4 stage 1 is 333.5 MFLOP); GFLOP/s = nominal FLOPs / median time, printed next to a plain
fp32 4704x128x128 GEMM measured in the same run. Backward FLOPs are counted as 2x forward.

Memory of forward+backward: on CUDA ``max_memory_allocated``; on CPU the peak of tensor bytes
allocated through PyTorch's CPU allocator during the call (torch.profiler memory events:
cumulative sum of allocations/frees, so it covers the extension's scratch too, not memory that
oneDNN/MKL allocate privately), plus the bytes autograd saves for backward besides the inputs.

Usage, from the repository root: ``python -m benchmarks attention [--repeats 20] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from benchmarks import common
from benchmarks.common import M4_HEADS, M4_KERNELS
from efficientvit_det.ops import cascaded_group_attention, resolve_backend
from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import fold_timm_attention, saved_tensor_bytes, timm_window_attention

__all__ = ['main', 'nominal_flops']

HEADS, KERNELS, KEY_DIM, WS = M4_HEADS, M4_KERNELS, 16, 7
CASES = ('timm', 'reference', 'fused', 'compiled')


def nominal_flops(B: int, C: int, H: int, W: int, heads: int = HEADS,
                  kernels: Sequence[int] = KERNELS, key_dim: int = KEY_DIM, ws: int = WS) -> int:
    """FLOPs (2 per multiply-add) of the original windowed computation, padded tokens included."""
    nh, nw = -(-H // ws), -(-W // ws)
    tokens = B * nh * nw * ws * ws
    cin = vd = C // heads
    N = ws * ws
    qkv = 2 * tokens * cin * (2 * key_dim + vd) * heads
    dw = 2 * tokens * key_dim * sum(k * k for k in kernels[:heads])
    attn = 2 * B * nh * nw * N * N * (key_dim + vd) * heads
    proj = 2 * tokens * C * heads * vd
    return qkv + dw + attn + proj


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
class _Setup:
    """Inputs, weights and callables of one stage shape."""

    def __init__(self, C, H, W, batch, device, seed, compile_ref: bool,
                 dtype: torch.dtype = torch.float32, fused_backend: str = 'auto'):
        self.C, self.H, self.W, self.B = C, H, W, batch
        self.device = device
        self.mod = timm_window_attention(C, HEADS, KERNELS, KEY_DIM, WS, seed=seed)
        with torch.no_grad():  # folded in float32, then every tensor in the benchmark's dtype
            self.params = {k: v.detach().to(device, dtype).contiguous()
                           for k, v in fold_timm_attention(self.mod).items()}
        self.mod = self.mod.to(device, dtype)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, C, H, W, generator=g).to(device, dtype)
        self.gy = torch.randn(batch, C, H, W, generator=g).to(device, dtype)
        self.fused_backend = resolve_backend(fused_backend, self.x)
        self.compiled = torch.compile(cga_reference, dynamic=False) if compile_ref else None

    def _timm(self, train: bool):
        """Inference: eval(). Training as the original detector trains: module in train mode
        (bias table gathered every call) with its BatchNorms in eval mode (norm_eval)."""
        self.mod.train(train)
        if train:
            for m in self.mod.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self.mod

    # forward (no grad)
    def fwd(self, case: str) -> Callable[[], Any]:
        x, p = self.x, self.params
        if case == 'timm':
            return lambda: _nograd(self._timm(train=False), x)
        if case == 'reference':
            return lambda: _nograd(lambda t: cga_reference(t, **p, key_dim=KEY_DIM), x)
        if case == 'fused':
            return lambda: _nograd(lambda t: cascaded_group_attention(
                t, **p, key_dim=KEY_DIM, backend=self.fused_backend), x)
        if case == 'compiled':
            return lambda: _nograd(lambda t: self.compiled(t, **p, key_dim=KEY_DIM), x)
        raise KeyError(case)

    # forward + backward (grads of x and of every weight)
    def fwdbwd(self, case: str) -> Callable[[], Any]:
        fn = self.fn(case)

        def run():
            x = self.x.detach().requires_grad_(True)
            fn(x).backward(self.gy)
            return x.grad
        return run

    def fn(self, case: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Differentiable callable of x; its weights are leaves that require grad."""
        if case == 'timm':
            for prm in self.mod.parameters():
                prm.requires_grad_(True)
                prm.grad = None
            self.leaves = list(self.mod.parameters())
            return lambda t: self._timm(train=True)(t)
        p = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        self.leaves = list(p.values())
        if case == 'reference':
            return lambda t: cga_reference(t, **p, key_dim=KEY_DIM)
        if case == 'fused':
            return lambda t: cascaded_group_attention(t, **p, key_dim=KEY_DIM,
                                                      backend=self.fused_backend)
        if case == 'compiled':
            return lambda t: self.compiled(t, **p, key_dim=KEY_DIM)
        raise KeyError(case)


def _nograd(fn, x):
    with torch.no_grad():
        return fn(x)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of tensor bytes allocated through PyTorch's CPU allocator while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get('name') == '[memory]'
                  and e.get('args', {}).get('Device Type', 0) == 0), key=lambda e: e['ts'])
    cur = peak = 0
    for e in mem:
        cur += int(e['args']['Bytes'])
        peak = max(peak, cur)
    return peak


def _saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 exclude: Sequence[torch.Tensor]) -> int:
    """Bytes autograd saves for backward, not counting tensors that exist anyway (inputs)."""
    return saved_tensor_bytes(lambda: fn(x), exclude)


def _memory(setup: _Setup, case: str) -> Dict[str, Any]:
    fn = setup.fn(case)
    x = setup.x.detach().requires_grad_(True)
    saved = _saved_bytes(fn, x, [x, *setup.leaves, *setup.mod.buffers()])
    run = setup.fwdbwd(case)
    run()  # warm (lazy initialisation is not part of the peak)
    if setup.device.type == 'cuda':
        pk = common.peak_memory(run, setup.device)
        peak = pk['peak_delta_mb'] * 2**20
        method = pk['method']
    else:
        peak = _cpu_peak_bytes(run)
        method = 'torch CPU allocator peak (profiler memory events)'
    return dict(peak_mb=peak / 2**20, saved_for_backward_mb=saved / 2**20, method=method)


def _gemm_case(device: torch.device) -> Callable[[], Any]:
    a = torch.randn(4704, 128, device=device)
    b = torch.randn(128, 128, device=device)
    return lambda: torch.mm(a, b)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m benchmarks attention',
        description='Windowed cascaded group attention: timm (original-style windows), '
                    'reference, fused, torch.compile(reference) at m4 stage shapes for an '
                    '800x1344 image; forward and forward+backward, FLOPs and peak memory.')
    p.add_argument('--batch', default=None,
                   help='comma list of images per call (default: 1 on CPU, 1,8 on CUDA)')
    p.add_argument('--dtypes', default=None,
                   help='comma list of fp32,fp16,bf16 (default: fp32 on CPU, all on CUDA)')
    p.add_argument('--stages', default='stage1,stage2,stage3',
                   help='comma list of stage1,stage2,stage3 (default: %(default)s)')
    p.add_argument('--image', nargs=2, type=int, default=(800, 1344), metavar=('H', 'W'),
                   help='input image size the stage shapes are derived from (default: 800 1344)')
    p.add_argument('--fused-backend', default='auto', choices=('auto', 'cpu', 'triton'),
                   help="the op backend of the 'fused' case (default: the device's; triton on "
                        'CPU tensors needs TRITON_INTERPRET=1: a smoke test of the benchmark)')
    p.add_argument('--cases', default=','.join(CASES),
                   help=f'comma list of {",".join(CASES)} (default: all)')
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile(reference)')
    p.add_argument('--no-backward', action='store_true', help='forward only')
    p.add_argument('--no-memory', action='store_true', help='skip the memory measurements')
    common.add_common_args(p, repeats=20, warmup=3)
    return p


def _parse_lists(args: argparse.Namespace, device: torch.device):
    cuda = device.type == 'cuda'
    batches = [int(b) for b in (args.batch or ('1,8' if cuda else '1')).split(',') if b]
    names = [d for d in (args.dtypes or ('fp32,fp16,bf16' if cuda else 'fp32')).split(',') if d]
    if set(names) - set(DTYPES) or not names:
        raise SystemExit(f'--dtypes: choose from {",".join(DTYPES)}, got {args.dtypes!r}')
    cases = [c for c in args.cases.split(',') if c]
    if args.no_compile and 'compiled' in cases:
        cases.remove('compiled')
    if set(cases) - set(CASES):
        raise SystemExit(f'unknown cases: {sorted(set(cases) - set(CASES))}')
    stages = [s for s in common.stage_shapes('m4', *args.image) if s[0] in args.stages.split(',')]
    if not stages:
        raise SystemExit('no stage selected')
    return batches, names, cases, stages


def _measure(st: _Setup, cases, modes, args, device, progress, label) -> Dict[str, Any]:
    """Timings (and fwd+bwd memory) of every case on one setup."""
    flops = nominal_flops(st.B, st.C, st.H, st.W)
    entry: Dict[str, Any] = dict(C=st.C, H=st.H, W=st.W, batch=st.B, fused_backend=st.fused_backend,
                                 nominal_mflop_fwd=flops / 1e6, modes={})
    for mode in modes:
        fns = {c: (st.fwd(c) if mode == 'fwd' else st.fwdbwd(c)) for c in cases}
        timing = common.time_interleaved(fns, args.repeats, args.warmup, device, progress,
                                         f'{label} {mode}')
        mode_flops = flops if mode == 'fwd' else 3 * flops
        entry['modes'][mode] = {c: dict(time=timing[c],
                                        gflops=mode_flops / (timing[c]['median_ms'] * 1e-3) / 1e9)
                                for c in cases}
    if 'fwd+bwd' in modes and not args.no_memory:
        entry['memory_fwd_bwd'] = {}
        for c in cases:
            progress.update(f'[{label}] memory: {c}', force=True)
            entry['memory_fwd_bwd'][c] = _memory(st, c)
    return entry


def _rows(label: str, entry: Dict[str, Any], cases, modes) -> list:
    fwd_base = entry['modes']['fwd'].get('timm' if 'timm' in cases else 'reference', {})
    fb_base = entry['modes'].get('fwd+bwd', {}).get('reference', {})
    base = {'fwd': fwd_base.get('time', {}).get('median_ms'),
            'fwd+bwd': fb_base.get('time', {}).get('median_ms')}
    rows = []
    for c in cases:
        for mode in modes:
            r = entry['modes'][mode][c]
            mem = entry.get('memory_fwd_bwd', {}).get(c) if mode == 'fwd+bwd' else None
            vs = f"{base[mode] / r['time']['median_ms']:.2f}x" if base[mode] else ''
            mflop = entry['nominal_mflop_fwd'] * (1 if mode == 'fwd' else 3)
            rows.append([label, mode, c, common.fmt_ms(r['time']), vs, f'{mflop:.0f}',
                         f"{r['gflops']:.0f}", f"{mem['peak_mb']:.1f}" if mem else '',
                         f"{mem['saved_for_backward_mb']:.1f}" if mem else ''])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = common.setup_from_args(args)
    batches, dtype_names, cases, stages = _parse_lists(args, device)
    progress = common.Progress(enabled=not args.quiet)
    modes = ['fwd'] + ([] if args.no_backward else ['fwd+bwd'])
    big = _Setup(*stages[0][1:], max(batches), device, args.seed, False,
                 fused_backend=args.fused_backend)

    def allocator_warmup():  # a large pass: the biggest map through the reference, fwd+bwd
        for c in ('reference', 'timm'):
            if c in cases:
                big.fwdbwd(c)()

    results: Dict[str, Any] = dict(machine=common.machine_info(device), batches=batches,
                                   dtypes=dtype_names, repeats=args.repeats, warmup=args.warmup,
                                   stages={})
    results['machine']['fused_backend'] = big.fused_backend
    gemm = common.time_interleaved({'gemm': _gemm_case(device)}, max(args.repeats, 20),
                                   args.warmup, device, progress, 'gemm', allocator_warmup)
    gemm_ms = gemm['gemm']['median_ms']
    gemm_gflops = 2 * 4704 * 128 * 128 / (gemm_ms * 1e-3) / 1e9
    results['gemm_4704x128x128'] = dict(time=gemm['gemm'], gflops=gemm_gflops)
    rows = []
    for i, (name, C, H, W) in enumerate(stages):
        for dname in dtype_names:
            for b in batches:
                st = _Setup(C, H, W, b, device, args.seed + i, 'compiled' in cases, DTYPES[dname],
                            args.fused_backend)
                label = f'{name} C={C} {H}x{W} B={b} {dname}'
                entry = _measure(st, cases, modes, args, device, progress, label)
                results['stages'][f'{name}/{dname}/B{b}'] = dict(entry, stage=name, dtype=dname)
                rows += _rows(label, entry, cases, modes)
    progress.done()
    headers = ['shape', 'mode', 'impl', 'ms median (IQR)', 'speed-up', 'MFLOP', 'GFLOP/s',
               'peak MB', 'saved MB']
    print(f"device: {results['machine'].get('gpu') or results['machine']['cpu']}, "
          f"threads {torch.get_num_threads()}, fused backend {results['machine']['fused_backend']},"
          f" repeats {args.repeats}")
    print(f'plain fp32 GEMM 4704x128x128: {gemm_ms:.3f} ms = {gemm_gflops:.0f} GFLOP/s')
    print('speed-up: fwd vs timm (original-style windows; vs reference without timm); fwd+bwd vs '
          'reference. MFLOP: nominal (original computation; fwd+bwd = 3x fwd). peak MB: fwd+bwd '
          'peak of tensor memory; saved MB: kept for backward beyond the inputs.')
    print(common.format_table(headers, rows))
    common.write_json(args.json, results)
    return results


if __name__ == '__main__':  # pragma: no cover
    main()
