"""Compile every Triton kernel of the fused attention op for real NVIDIA GPUs, offline.

    python tools/triton_compile_check.py --arch 80 90
    python tools/triton_compile_check.py --arch 90 --dtype fp16 fp32 --problem 128,4,7 --json r.json

For each target ``sm_<arch>`` it compiles, from a cold cache (a fresh ``TRITON_CACHE_DIR``),
the forward and backward kernels the op launches for every attention stage of the m0-m5
presets and every dtype (fp32 once per fp32 precision, ``ieee`` and ``tf32``), exactly as
:func:`efficientvit_det.ops.cga_triton.kernel_specs` configures them (problems sharing block
sizes share a binary). No GPU is needed: Triton lowers to PTX and runs ``ptxas``. Prints one row
per kernel (compile seconds, registers, spill bytes, shared memory) and the total per target.
Exit status 1 if a kernel fails to compile, spills registers, would be specialised differently
by the launcher, or has non-coherent loads or atomics (docs/triton.md).
"""
import os

os.environ['TRITON_INTERPRET'] = '0'  # the kernels must be decorated for compilation

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from efficientvit_det.archs import ARCH_SETTINGS  # noqa: E402
from efficientvit_det.ops import cga_triton  # noqa: E402

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
_TASKS: list = []  # (spec, arch) of the target being compiled, read by forked workers


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Offline compile check of the Triton kernels')
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        help='compute capabilities to target (80 = A100, 90 = H100)')
    parser.add_argument('--dtype', nargs='+', choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument('--precision', nargs='+', choices=('ieee', 'tf32'),
                        default=['ieee', 'tf32'], help='fp32 dot precisions to cover')
    parser.add_argument('--problem', action='append', default=None, metavar='C,HEADS,K',
                        help='only this stage shape (repeatable); default: every m0-m5 stage')
    parser.add_argument('--kernel', nargs='+', choices=('forward', 'backward'),
                        default=['forward', 'backward'])
    parser.add_argument('--num-warps', type=int, default=None,
                        help='override the table (to try a change; not what the op launches)')
    parser.add_argument('--jobs', type=int, default=min(2, os.cpu_count() or 1),
                        help='compile in this many processes')
    parser.add_argument('--json', default=None, help='also write the rows to this file')
    return parser.parse_args(argv)


def _problems(args) -> List[tuple]:
    if not args.problem:
        return cga_triton.stage_problems(ARCH_SETTINGS)
    try:
        return [tuple(int(v) for v in p.split(',')) for p in args.problem]
    except ValueError:
        raise SystemExit(f'--problem takes C,HEADS,K (e.g. 128,4,7), got {args.problem}') \
            from None


def _launcher_mismatch(spec, arch: int) -> Optional[str]:
    """Why the JIT launcher would compile something else than ``spec`` (None if it would not).

    Binds sample arguments the way ``kernel[grid](...)`` does, for two sets of sizes (all 1,
    all 37: Triton specialises ints equal to 1 or divisible by 16 unless told not to), and
    compares signature and attributes with the spec's. Uses Triton internals."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = spec.fn
    backend = make_backend(triton.backends.compiler.GPUTarget('cuda', arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    opts = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    for size in (1, 37):
        args = {}
        for name, ty in spec.signature.items():
            args[name] = (torch.empty(64, dtype=DTYPES[ty[1:]]) if ty.startswith('*')
                          else size if ty == 'i32' else 0.25)
        bound, specialization, options = binder(**args, **spec.constexprs, **opts)
        _, sig, _, attrs = fn._pack_args(backend, opts, bound, specialization, options)
        attrs = {k: v for k, v in attrs.items() if v}
        if sig != spec.full_signature() or attrs != spec.divisibility_attrs():
            return f'sizes={size}: launcher builds {sig} {attrs}'
    return None


def _compile_task(index: int) -> dict:
    spec, arch = _TASKS[index]
    try:
        launcher = _launcher_mismatch(spec, arch)
    except Exception as exc:  # Triton internals moved: report, do not fail the compile check
        launcher = f'not checked ({type(exc).__name__}: {exc})'
    try:
        return dict(ok=True, launcher=launcher or 'same', **cga_triton.compile_spec(spec, arch))
    except Exception as exc:  # report every failure, keep compiling the others
        return dict(ok=False, error=f'{type(exc).__name__}: {exc}',
                    trace=traceback.format_exc(limit=3))


def _rows(args) -> List[dict]:
    specs = cga_triton.unique_specs(_problems(args), [DTYPES[d] for d in args.dtype],
                                    precisions=args.precision)
    specs = [(s, p) for s, p in specs if s.name in args.kernel]
    if args.num_warps:
        specs = [(replace(s, num_warps=args.num_warps), p) for s, p in specs]
    rows = []
    for arch in args.arch:
        for spec, probs in specs:
            dtype = spec.signature['qkv_ptr'][1:]
            if dtype == 'fp32':
                dtype += '/' + spec.constexprs['PREC']
            rows.append(dict(kernel=spec.name, arch=f'sm_{arch}', dtype=dtype,
                             BC=spec.constexprs['BC'], BN=spec.constexprs['BN'],
                             num_warps=spec.num_warps, num_stages=spec.num_stages,
                             shapes=[f'C{c}/h{h}/K{k}' for c, h, k in probs], _spec=spec))
    return rows


def _run(rows: List[dict], jobs: int) -> None:
    """Compile every row's kernel (forked workers inherit the specs and the cold cache dir)."""
    _TASKS[:] = [(r.pop('_spec'), int(r['arch'][3:])) for r in rows]
    if jobs > 1:
        ctx = multiprocessing.get_context('fork')
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_task, range(len(rows))))
    else:
        results = [_compile_task(i) for i in range(len(rows))]
    for row, res in zip(rows, results):
        row.update(res)


def _print_table(rows: List[dict], wall: dict) -> None:
    head = (f'{"kernel":9} {"arch":6} {"dtype":10} {"BC":>3} {"warps":>5} {"shapes":>6} '
            f'{"compile s":>9} {"regs":>5} {"spill B":>8} {"shared B":>8}')
    print(head)
    print('-' * len(head))
    for r in rows:
        if r['ok']:
            spill = r['spill_stores'] + r['spill_loads']
            print(f'{r["kernel"]:9} {r["arch"]:6} {r["dtype"]:10} {r["BC"]:>3} '
                  f'{r["num_warps"]:>5} {len(r["shapes"]):>6} {r["seconds"]:>9.1f} '
                  f'{r["registers"]:>5} {spill:>8} {r["shared"]:>8}')
        else:
            print(f'{r["kernel"]:9} {r["arch"]:6} {r["dtype"]:10} FAILED: {r["error"]}')
    for arch, secs in wall.items():
        mine = [r for r in rows if r['arch'] == arch and r['ok']]
        print(f'{arch}: {len(mine)} kernels, {sum(r["seconds"] for r in mine):.1f} s of compile '
              f'time, {secs:.1f} s wall')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    rows = _rows(args)
    print(f'triton {triton.__version__}, {len(rows)} kernels, {args.jobs} job(s), cold cache')
    wall = {}
    with tempfile.TemporaryDirectory(prefix='triton-cache-') as cache:
        os.environ['TRITON_CACHE_DIR'] = triton.knobs.cache.dir = cache  # cold cache
        triton.knobs.compilation.always_compile = True  # never a cache hit, even between jobs
        for arch in args.arch:
            start = time.perf_counter()
            _run([r for r in rows if r['arch'] == f'sm_{arch}'], args.jobs)
            wall[f'sm_{arch}'] = time.perf_counter() - start
    _print_table(rows, wall)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(triton=triton.__version__, rows=rows, wall_seconds=wall), f, indent=1)
    compiled = [r for r in rows if r['ok']]
    failed = [r for r in rows if not r['ok']]
    spilled = [r for r in compiled if r['spill_stores'] + r['spill_loads']]
    unsafe = [r for r in compiled if r['nc_loads'] or r['atomics']]  # docs/triton.md, facts
    other = [r for r in compiled if r['launcher'] != 'same']
    print('launcher specialisation: ' + ('the compiled one, for any image size' if not other
                                         else '; '.join({r['launcher'] for r in other})))
    for r in failed:
        print(f'\n{r["kernel"]} {r["arch"]} {r["dtype"]}:\n{r["trace"]}', file=sys.stderr)
    mismatch = [r for r in other if not r['launcher'].startswith('not checked')]
    if failed or spilled or mismatch or unsafe:
        print(f'FAIL: {len(failed)} kernel(s) did not compile, {len(spilled)} spill registers, '
              f'{len(mismatch)} would be specialised differently at launch, {len(unsafe)} have '
              f'non-coherent loads or atomics', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
