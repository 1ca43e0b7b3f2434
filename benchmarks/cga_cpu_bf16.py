"""Benchmark of the C++ CPU kernel of the fused cascaded group attention in bfloat16.

Competitors, on the same BN-folded weights (float32, as the backbone folds them under autocast):

* ``C++ fp32``           the extension on float32 x;
* ``C++ bf16``           the extension on bfloat16 x with the float32 weights, at the widest ISA
                         (``avx512bf16``: the qkv and projection 1x1 convs with ``vdpbf16ps``);
* ``C++ bf16 fp32-math`` the same call forced to the ``avx512`` ISA: bf16 loads/stores, float32
                         compute inside the window (shown only where AVX512-BF16 exists; it is
                         the scheme a CPU without it runs);
* ``ref fp32``           :func:`efficientvit_det.ops.cga_reference.cga_reference` in float32;
* ``ref autocast``       the reference under ``torch.autocast('cpu', torch.bfloat16)``.

Shapes: m4's three stages for an 800x1344 image (C=128 @ 50x84, 256 @ 25x42, 384 @ 13x21; 4 heads,
kernels 7,5,3,3, key_dim 16). Modes: forward (no grad) and forward+backward (grads of x and of
all weights; the C++ cases call the extension's ``forward`` and ``backward`` directly). The
``rel err`` column is max |y - y_ref| / max |y_ref| of the forward output against the float32
reference on the case's own input (the bf16-rounded x for the bf16 cases). Timing as in
docs/facts.md "Measuring": allocator warmed by the largest case first, cases interleaved in one
process, median and quartiles of repeats; each sample is taken on the wall clock and on the
process CPU clock (with ``--threads 1`` CPU time is the robust measure on a shared machine, see
:func:`benchmarks.common.time_interleaved` with ``cpu_clock``).

Usage, from the repository root:
``python -m benchmarks attention-cpu-bf16 [--threads 1] [--repeats 20] [--modes fwd] [--json F]``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

from benchmarks import common
from benchmarks.common import M4_HEADS, M4_KERNELS, M4_STAGES
from efficientvit_det.cpu import cpu_info
from efficientvit_det.ops.cga_reference import cga_reference
from efficientvit_det.testing import fold_timm_attention, max_rel_err, timm_window_attention

__all__ = ['main', 'cpu_bf16_info']

HEADS, KERNELS, KEY_DIM, WS = M4_HEADS, M4_KERNELS, 16, 7
SCALE = KEY_DIM ** -0.5
PARAM_ORDER = ('qkv_weight', 'qkv_bias', 'dw_weight', 'dw_bias', 'attn_bias', 'proj_weight',
               'proj_bias')


def _load_ext():
    try:
        from efficientvit_det.ops import _cga_cpu  # type: ignore[attr-defined]
    except ImportError as exc:
        raise SystemExit(f'the C++ extension efficientvit_det.ops._cga_cpu is not built ({exc}); '
                         f'build it with `pip install --no-build-isolation --no-deps -e .`'
                         ) from exc
    return _cga_cpu


def cpu_bf16_info(ext) -> Dict[str, Any]:
    """The CPU (:func:`efficientvit_det.cpu.cpu_info`) and the kernel's own run-time view."""
    return dict(cpu_info().as_dict(), kernel_isa=ext.isa(),
                kernel_cpu_bf16_native=bool(ext.cpu_bf16_native()))


class _Stage:
    """Inputs and callables of one stage shape."""

    def __init__(self, ext, C: int, H: int, W: int, seed: int):
        self.ext = ext
        mod = timm_window_attention(C, HEADS, KERNELS, KEY_DIM, WS, seed=seed).eval()
        with torch.no_grad():
            p = fold_timm_attention(mod)
        self.w = [p[k].detach().float().contiguous() for k in PARAM_ORDER]
        g = torch.Generator().manual_seed(seed)
        self.x32 = torch.randn(1, C, H, W, generator=g)
        self.xbf = self.x32.bfloat16()
        self.gy32 = torch.randn(1, C, H, W, generator=g)
        self.gybf = self.gy32.bfloat16()

    # --- C++ extension ---------------------------------------------------------------------
    def _ext_call(self, x, gy, isa: str, backward: bool) -> Callable[[], Any]:
        ext, w = self.ext, self.w

        def run():
            ext.set_isa(isa)
            y = ext.forward(x, *w, KEY_DIM, WS, SCALE)
            if backward:
                return ext.backward(gy, x, *w, KEY_DIM, WS, SCALE)
            return y
        return run

    # --- reference ---------------------------------------------------------------------------
    def _ref_call(self, x, gy, autocast: bool, backward: bool) -> Callable[[], Any]:
        def ctx():
            return torch.autocast('cpu', dtype=torch.bfloat16) if autocast \
                else contextlib.nullcontext()

        def run():
            if not backward:
                with torch.no_grad(), ctx():
                    return cga_reference(x, *self.w, KEY_DIM, WS, SCALE)
            leaves = [x.detach().requires_grad_(True)] + \
                     [t.detach().requires_grad_(True) for t in self.w]
            with ctx():
                y = cga_reference(*leaves, KEY_DIM, WS, SCALE)
            y.backward(gy)
            return [t.grad for t in leaves]
        return run

    def cases(self, backward: bool, best_isa: str, with_fp32_math: bool
              ) -> Dict[str, Callable[[], Any]]:
        out = {
            'C++ fp32': self._ext_call(self.x32, self.gy32, best_isa, backward),
            'C++ bf16': self._ext_call(self.xbf, self.gybf, best_isa, backward),
        }
        if with_fp32_math:
            out['C++ bf16 fp32-math'] = self._ext_call(self.xbf, self.gybf, 'avx512', backward)
        out['ref fp32'] = self._ref_call(self.x32, self.gy32, False, backward)
        out['ref autocast'] = self._ref_call(self.xbf, self.gybf, True, backward)
        return out

    def forward_errors(self, cases: Dict[str, Callable[[], Any]]) -> Dict[str, float]:
        """Forward output of every case against the fp32 reference on that case's own input
        (the bf16 cases: on the bf16-rounded x), so only the arithmetic differs."""
        with torch.no_grad():
            ref32 = cga_reference(self.x32, *self.w, KEY_DIM, WS, SCALE)
            refbf = cga_reference(self.xbf.float(), *self.w, KEY_DIM, WS, SCALE)
        errs = {}
        for name, fn in cases.items():
            y = fn()
            errs[name] = max_rel_err(y.float(), refbf if y.dtype == torch.bfloat16 else ref32)
        return errs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m benchmarks attention-cpu-bf16',
        description='C++ CGA kernel in bfloat16 vs float32 and vs the PyTorch reference '
                    '(plain and under bf16 autocast), m4 stage shapes at 800x1344, CPU.')
    common.add_common_args(p, repeats=20, warmup=2)
    p.add_argument('--modes', default='fwd,fwdbwd',
                   help='comma list of fwd, fwdbwd (default: %(default)s)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == 'cuda':
        raise SystemExit('this benchmark is CPU only (--device cpu)')
    args.device = 'cpu'
    device = common.setup_from_args(args)
    ext = _load_ext()
    modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    bad = [m for m in modes if m not in ('fwd', 'fwdbwd')]
    if bad:
        raise SystemExit(f'--modes: unknown {bad}; choose from fwd, fwdbwd')
    ext.set_isa('')
    best_isa = ext.isa()
    with_fp32_math = best_isa == 'avx512bf16'
    cpu = cpu_bf16_info(ext)
    progress = common.Progress(enabled=not args.quiet)
    stages = {name: _Stage(ext, C, H, W, args.seed) for name, C, H, W in M4_STAGES}
    # allocator warm-up: the largest case (stage 1, reference fp32 forward+backward)
    warm = stages['stage1'].cases(True, best_isa, False)['ref fp32']
    results: List[Dict[str, Any]] = []
    try:
        for mode in modes:
            for name, C, H, W in M4_STAGES:
                st = stages[name]
                cases = st.cases(mode == 'fwdbwd', best_isa, with_fp32_math)
                errs = st.forward_errors(st.cases(False, best_isa, with_fp32_math))
                stats = common.time_interleaved(cases, args.repeats, args.warmup,
                                                 torch.device('cpu'), progress, f'{mode} {name}',
                                                 warm, cpu_clock=True)
                warm = None
                for case, s in stats.items():
                    results.append(dict(mode=mode, stage=name, C=C, H=H, W=W, case=case,
                                        rel_err_fwd=errs[case], **s))
    finally:
        ext.set_isa('')
    progress.done()
    _print_table(results, cpu)
    common.write_json(args.json, dict(benchmark='cga_cpu_bf16', cpu_bf16=cpu,
                                      machine=common.machine_info(device), args=vars(args),
                                      results=results))
    return 0


def _print_table(results: List[Dict[str, Any]], cpu: Dict[str, Any]) -> None:
    def med(mode, stage, case, key):
        for r in results:
            if (r['mode'], r['stage'], r['case']) == (mode, stage, case):
                return r[key]
        return float('nan')

    rows = []
    for r in results:
        ratios = []
        for key in ('median_ms', 'cpu_median_ms'):
            base = med(r['mode'], r['stage'], 'C++ fp32', key)
            ac = med(r['mode'], r['stage'], 'ref autocast', key)
            ratios.append(f"{base / r[key]:.2f}x / {ac / r[key]:.2f}x")
        cpu_ms = dict(median_ms=r['cpu_median_ms'], q1_ms=r['cpu_q1_ms'], q3_ms=r['cpu_q3_ms'])
        rows.append([r['mode'], f"{r['stage']} C={r['C']} {r['H']}x{r['W']}", r['case'],
                     common.fmt_ms(r), ratios[0], common.fmt_ms(cpu_ms), ratios[1],
                     f"{r['rel_err_fwd']:.1e}"])
    print(f"CPU: {cpu_info().describe()} | kernel ISA: {cpu.get('kernel_isa')} | "
          f"kernel cpu_bf16_native: {cpu.get('kernel_cpu_bf16_native')} | "
          f"threads: {torch.get_num_threads()}")
    print('speed-up columns: (C++ fp32 time) / (case time) and (ref autocast time) / (case time)')
    print(common.format_table(
        ['mode', 'shape', 'case', 'wall ms, median (IQR)', 'wall: vs C++ fp32 / vs autocast',
         'CPU ms, median (IQR)', 'CPU: vs C++ fp32 / vs autocast', 'rel err (fwd)'], rows))


if __name__ == '__main__':
    sys.exit(main())
