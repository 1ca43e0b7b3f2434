"""The one command for a GPU machine: everything about the Triton attention kernels, measured.

    python tools/gpu_validate.py                       # on a CUDA machine, <= 8 min on one H100
    python tools/gpu_validate.py --out work_dirs/gpu   # JSON + markdown table there
    python tools/gpu_validate.py --smoke               # tiny version on CPU (Triton interpreter)

Steps (each one's failure is recorded and the next one still runs):

1. ``environment``: GPU, compute capability, driver, CUDA, torch, triton.
2. ``compile``: ``tools/triton_compile_check.py`` for the visible GPU's arch (every kernel, every
   dtype, zero spills).
3. ``tests``: the CUDA tests (``pytest -k cuda`` over the op's test files).
4. ``accuracy``: the kernels' output and all eight gradients against the PyTorch reference run
   in the same dtype (the comparison and tolerance of the op's verification on first use,
   ``efficientvit_det/ops/guard.py``) and against float64, for every attention stage shape of
   m0-m5 at 800x1344, in fp32, fp16 and bf16.
5. ``attention``: ``python -m benchmarks attention`` (batch 1 and 8, forward and
   forward+backward, peak memory) and the issue's targets (fp16 stage 1 batch 8: forward >= 3x
   the eager reference, forward+backward >= 2x with >= 3x less peak memory).
6. ``train``: a RetinaNet-m4 training step at 800x1344, batch 2: fp32 and AMP, fused against
   the module path (time, peak memory, and the losses of 10 iterations from the same seed).
7. ``inference``: RetinaNet-m4 per image (``test_step``, NMS included) in fp32, fp16, bf16.

Writes ``gpu_validate.json`` and ``gpu_validate.md`` under ``--out``; exit status 1 if a step
failed. ``--smoke`` runs the same steps at tiny sizes on the CPU as a CI test that keeps this script
working: the kernels' accuracy and the attention benchmark under the Triton interpreter
(``TRITON_INTERPRET=1``; fp32 and fp16: the interpreter computes bf16 dots wrongly), the
detector steps through the op's ``auto`` on CPU tensors (the C++ kernels: the interpreter needs
minutes for a whole RetinaNet-m4).
The verification on first use is on for every step (``EVIT_CGA_VERIFY=1``), and every shape
class the safety net moved to the reference is listed.
"""
import argparse
import json
import os
import os.path as osp
import platform
import re
import subprocess
import sys
import time
import traceback

SMOKE = '--smoke' in sys.argv[1:]
if SMOKE:  # before triton is imported: the kernels are decorated for the interpreter
    os.environ['TRITON_INTERPRET'] = '1'
os.environ.setdefault('EVIT_CGA_VERIFY', '1')
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TARGETS = dict(fwd_speedup=3.0, fwd_bwd_speedup=2.0, fwd_bwd_memory_ratio=3.0)
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


class Plan:
    """Sizes of every step: the real run or the smoke test."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device('cpu' if smoke else 'cuda')
        self.arch_check = ['--arch', '80', '--dtype', 'fp16', '--problem', '64,4,5', '--kernel',
                           'forward', '--jobs', '1'] if smoke else None
        self.acc_image = (112, 112) if smoke else (800, 1344)  # smoke: one 7x7 window
        self.acc_archs = ('m0',) if smoke else ('m0', 'm1', 'm2', 'm3', 'm4', 'm5')
        self.acc_stages = 1 if smoke else 3  # attention stages per arch
        # the interpreter computes bf16 dots wrongly: bf16 is checked on GPUs only
        self.acc_dtypes = ('fp32', 'fp16') if smoke else ('fp32', 'fp16', 'bf16')
        self.bench = (['--device', 'cpu', '--fused-backend', 'triton', '--image', '112', '112',
                       '--batch', '1', '--dtypes', 'fp32', '--repeats', '1', '--warmup', '0',
                       '--stages', 'stage1', '--cases', 'reference,fused']
                      if smoke else ['--device', 'cuda', '--batch', '1,8', '--repeats', '20',
                                     '--cases', 'timm,reference,fused'])
        self.train = dict(batch=1, height=64, width=64, iters=1) if smoke else \
            dict(batch=2, height=800, width=1344, iters=10)
        self.infer = dict(height=64, width=64, repeats=1, dtypes=('fp32', 'bf16')) if smoke else \
            dict(height=800, width=1344, repeats=20, dtypes=('fp32', 'fp16', 'bf16'))


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def step_environment(plan: Plan) -> dict:
    import triton
    env = dict(python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               interpreter=os.environ.get('TRITON_INTERPRET') == '1')
    if plan.device.type == 'cuda':
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f'{props.major}.{props.minor}',
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        try:
            env['driver'] = subprocess.run(
                ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env['driver'] = 'unknown (no nvidia-smi)'
    else:
        from efficientvit_det.cpu import cpu_info
        env.update(gpu='none (smoke: CPU, Triton interpreter)', cpu=cpu_info().describe())
    return dict(summary=f"{env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | "
                        f"CUDA {env['cuda']} | driver {env.get('driver', '-')}", **env)


def step_compile(plan: Plan, out: str) -> dict:
    if plan.arch_check is None:
        major, minor = torch.cuda.get_device_capability(0)
        args = ['--arch', str(major * 10 + minor)]
    else:
        args = plan.arch_check
    path = osp.join(out, 'triton_compile_check.json')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'triton_compile_check.py'),
                          *args, '--json', path], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    rows = json.load(open(path))['rows'] if osp.exists(path) else []
    spills = sum(r.get('spill_stores', 0) + r.get('spill_loads', 0) for r in rows)
    failed = [r for r in rows if not r.get('ok')]
    ok = run.returncode == 0 and rows and not failed and spills == 0
    return dict(ok=bool(ok), kernels=len(rows), failed=len(failed), spill_bytes=spills,
                args=args, summary=f'{len(rows)} kernels ({" ".join(args)}), {len(failed)} '
                f'failed, {spills} spill bytes', output_tail=(run.stdout + run.stderr)[-2000:])


def step_tests(plan: Plan, out: str) -> dict:
    files = ['tests/test_ops_triton.py', 'tests/test_ops_dispatch.py', 'tests/test_ops_guard.py']
    cmd = [sys.executable, '-m', 'pytest', *files, '-k', 'cuda', '-q', '-p', 'no:cacheprovider',
           f'--junitxml={osp.join(out, "cuda_tests.xml")}']
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None) if not plan.smoke else None
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    last = (run.stdout.strip().splitlines() or [''])[-1]
    counts = {k: int(v) for v, k in re.findall(r'(\d+) (passed|failed|skipped|error)', last)}
    ok = run.returncode in (0, 5) and not counts.get('failed') and not counts.get('error')
    if not plan.smoke and not counts.get('passed'):
        ok = False  # on a GPU the CUDA tests must run
    return dict(ok=ok, command=' '.join(cmd[1:]), counts=counts, summary=last,
                output_tail=run.stdout[-3000:] + run.stderr[-1000:])


def _stage_cases(plan: Plan):
    from benchmarks.common import stage_shapes
    from efficientvit_det.archs import ARCH_SETTINGS
    seen = {}
    for arch in plan.acc_archs:
        cfg = ARCH_SETTINGS[arch]
        shapes = stage_shapes(arch, *plan.acc_image)[:plan.acc_stages]
        for (name, C, H, W), heads in zip(shapes, cfg['num_heads']):
            key = (C, heads, tuple(cfg['kernels'][:heads]), H, W)
            seen.setdefault(key, f'{arch}/{name}')
    return seen


def step_accuracy(plan: Plan, out: str) -> dict:
    sys.path.insert(0, osp.join(ROOT, 'tests'))
    from helpers import cga_inputs

    from efficientvit_det.ops import cga_triton, guard
    rows, worst_ok = [], True
    for (C, heads, kernels, H, W), where in _stage_cases(plan).items():
        ins = cga_inputs(1, C, H, W, heads, kernels, dtype=torch.float32, seed=C + H,
                         device=plan.device)
        gy = torch.randn(ins[0].shape, generator=torch.Generator().manual_seed(1)).to(plan.device)
        meta = (16, 7, 16 ** -0.5)
        exact_y = guard.reference_forward([t.double() for t in ins], meta)
        exact_g = guard.reference_grads(gy.double(), [t.double() for t in ins], meta)
        for dname in plan.acc_dtypes:
            dt = DTYPES[dname]
            args = [ins[0].to(dt), *ins[1:]]  # the autocast layout: fp32 weights
            try:
                y = cga_triton.forward(*args, *meta)
                grads = cga_triton.backward(gy.to(dt), *args, *meta)
            except Exception as exc:  # noqa: BLE001 - recorded as this row's failure
                rows.append(dict(shape=where, C=C, heads=heads, H=H, W=W, dtype=dname, ok=False,
                                 failure=f'{type(exc).__name__}: {exc}'))
                worst_ok = False
                continue
            names = ['output', *(f'grad {n}' for n in guard.GRAD_NAMES)]
            outs = dict(zip(names, [y, *grads]))
            refs = dict(zip(names, [guard.reference_forward(args, meta),
                                    *guard.reference_grads(gy.to(dt), args, meta)]))
            exact32 = None
            if dt != torch.float32:  # half precision: judged against float32 (the verification)
                up = [args[0].float(), *args[1:]]
                exact32 = dict(zip(names, [guard.reference_forward(up, meta),
                                           *guard.reference_grads(gy, up, meta)]))
            checks = guard.bounds(outs, refs, exact32, dt, plan.device)
            worst = max(checks, key=lambda k: checks[k][0] / checks[k][1])
            ok = all(e <= b for e, b in checks.values())
            exact = [guard.compare(v, e) for v, e in zip(outs.values(), [exact_y, *exact_g])]
            ref_exact = [guard.compare(v, e) for v, e in zip(refs.values(), [exact_y, *exact_g])]
            expected_bad = plan.smoke and dname == 'bf16'  # the interpreter's bf16 dots
            worst_ok &= ok or expected_bad
            rows.append(dict(shape=where, C=C, heads=heads, kernels=list(kernels), H=H, W=W,
                             dtype=dname, ok=ok, worst=worst, error=checks[worst][0],
                             bound=checks[worst][1],
                             vs_float64=max(e for e in exact if e is not None),
                             reference_vs_float64=max(e for e in ref_exact if e is not None),
                             note='interpreter bf16 dots are wrong' if expected_bad else ''))
    bad = [r for r in rows if not r['ok']]
    return dict(ok=worst_ok, rows=rows, summary=f'{len(rows)} (shape, dtype) cases, '
                f'{len(rows) - len(bad)} within the verification bounds'
                + (' (bf16 under the interpreter: expected)' if plan.smoke and bad else ''))


def step_attention(plan: Plan, out: str) -> dict:
    from benchmarks import attention
    path = osp.join(out, 'attention.json')
    res = attention.main([*plan.bench, '--json', path, '--quiet'])
    checks = {}
    key = next((k for k in res['stages'] if k.startswith('stage1/fp16/B8')), None)
    if key is not None:
        e = res['stages'][key]
        fwd = e['modes']['fwd']
        fb = e['modes']['fwd+bwd']
        mem = e.get('memory_fwd_bwd', {})
        checks = dict(
            fwd_speedup=fwd['reference']['time']['median_ms'] / fwd['fused']['time']['median_ms'],
            fwd_bwd_speedup=fb['reference']['time']['median_ms'] / fb['fused']['time']['median_ms'],
            fwd_bwd_memory_ratio=(mem['reference']['peak_mb'] / max(mem['fused']['peak_mb'], 1e-9)
                                  if mem else None))
    met = {k: (v is not None and v >= TARGETS[k]) for k, v in checks.items()}
    return dict(ok=True, json=path, targets=TARGETS, measured=checks, targets_met=met,
                summary=', '.join(f'{k} {v:.2f} (target {TARGETS[k]})' for k, v in checks.items()
                                  if v is not None) or f'{len(res["stages"])} shapes measured')


def _train_run(plan: Plan, spec: str, amp: bool) -> dict:
    from benchmarks.common import synchronize
    from benchmarks.detector import TrainStep
    p = plan.train
    step = TrainStep(spec, plan.device, p['batch'], p['height'], p['width'], seed=0)
    if amp:
        if plan.device.type == 'cuda':
            from mmengine.optim import AmpOptimWrapper
            step.optim = AmpOptimWrapper(optimizer=step.optim.optimizer, loss_scale='dynamic')
        else:
            from efficientvit_det.engine.amp import CpuAmpOptimWrapper
            step.optim = CpuAmpOptimWrapper(optimizer=step.optim.optimizer)
    if plan.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(p['iters']):
        synchronize(plan.device)
        t0 = time.perf_counter()
        step()
        synchronize(plan.device)
        times.append(time.perf_counter() - t0)
    steady = sorted(times[1:] or times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if plan.device.type == 'cuda' else None
    return dict(model=spec, amp=amp, losses=step.losses, median_ms=1e3 * steady[len(steady) // 2],
                first_ms=1e3 * times[0], peak_mb=peak)


def step_train(plan: Plan, out: str) -> dict:
    runs, checks = [], {}
    for amp in (False, True):
        fused = _train_run(plan, 'm4', amp)  # attn_backend 'auto': the fused op
        module = _train_run(plan, 'm4+module', amp)  # the module path (plain PyTorch)
        runs += [fused, module]
        diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(fused['losses'],
                                                                  module['losses']))
        tol = 2e-2 if amp else 1e-3
        checks['amp' if amp else 'fp32'] = dict(
            max_rel_loss_diff=diff, tolerance=tol, equal_losses=diff <= tol,
            speedup=module['median_ms'] / fused['median_ms'],
            memory_ratio=(module['peak_mb'] / fused['peak_mb']) if fused['peak_mb'] else None)
    ok = all(c['equal_losses'] for c in checks.values())
    return dict(ok=ok, runs=runs, checks=checks, summary='; '.join(
        f"{k}: losses within {c['max_rel_loss_diff']:.1e} (tol {c['tolerance']}), fused "
        f"{c['speedup']:.2f}x" for k, c in checks.items()))


def step_inference(plan: Plan, out: str) -> dict:
    from benchmarks.common import time_interleaved
    from benchmarks.detector import build_model, make_train_batch
    p = plan.infer
    model = build_model('m4', plan.device)[0]
    data = make_train_batch(1, p['height'], p['width'], seed=0)
    cases = {}
    for dname in p['dtypes']:
        def run(dt=DTYPES[dname]):
            with torch.no_grad(), torch.autocast(plan.device.type, dtype=dt,
                                                 enabled=dt != torch.float32):
                return model.test_step(data)
        cases[dname] = run
    stats = time_interleaved(cases, p['repeats'], 1, plan.device)
    rows = {k: v['median_ms'] for k, v in stats.items()}
    return dict(ok=True, ms_per_image=rows, summary=', '.join(f'{k} {v:.1f} ms' for k, v in
                                                             rows.items()))


STEPS = dict(environment=step_environment, compile=step_compile, tests=step_tests,
             accuracy=step_accuracy, attention=step_attention, train=step_train,
             inference=step_inference)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _guard_state() -> list:
    from efficientvit_det.ops import guard
    return [dict(shape_class=f'{cls[0]} {cls[1]} C={cls[2]} heads={cls[3]} K={cls[4]}',
                 disabled=st.disabled) for cls, st in guard._STATE.items() if st.disabled]


def markdown(report: dict) -> str:
    lines = [f"# tools/gpu_validate.py{' --smoke' if report['smoke'] else ''}", '',
             f"{report['steps'].get('environment', {}).get('summary', '')}", '',
             '| step | status | seconds | result |', '|---|---|---|---|']
    for name, r in report['steps'].items():
        status = 'ok' if r.get('ok', True) else 'FAILED'
        lines.append(f"| {name} | {status} | {r.get('seconds', 0):.1f} | "
                     f"{r.get('summary', r.get('error', '')).replace('|', '/')} |")
    acc = report['steps'].get('accuracy', {}).get('rows', [])
    if acc:
        lines += ['', '| shape | dtype | worst output | error | bound | vs float64 | '
                  'reference vs float64 |', '|---|---|---|---|---|---|---|']
        for r in acc:
            if 'failure' in r:
                lines.append(f"| {r['shape']} C={r['C']} {r['H']}x{r['W']} | {r['dtype']} | "
                             f"{r['failure']} | | | | |")
                continue
            lines.append(f"| {r['shape']} C={r['C']} {r['H']}x{r['W']} | {r['dtype']} | "
                         f"{r['worst']} | {r['error']:.2e} | {r['bound']:.2e} | "
                         f"{r['vs_float64']:.2e} | {r['reference_vs_float64']:.2e} |")
    train = report['steps'].get('train', {}).get('runs', [])
    if train:
        lines += ['', '| training step | AMP | median ms | first ms | peak MiB | losses |',
                  '|---|---|---|---|---|---|']
        for r in train:
            peak = f"{r['peak_mb']:.0f}" if r['peak_mb'] else '-'
            losses = ' '.join(f'{v:.4f}' for v in r['losses'])
            lines.append(f"| {r['model']} | {r['amp']} | {r['median_ms']:.1f} | "
                         f"{r['first_ms']:.1f} | {peak} | {losses} |")
    if report['moved_to_reference']:
        lines += ['', 'Shape classes the safety net moved to the reference:', '']
        lines += [f"- {c['shape_class']}: {c['disabled']}" for c in report['moved_to_reference']]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--smoke', action='store_true',
                        help='tiny sizes on the CPU under the Triton interpreter (CI)')
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs', 'gpu_validate'))
    parser.add_argument('--steps', nargs='+', choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print('error: no CUDA device; run on a GPU machine, or --smoke for the CPU version',
              file=sys.stderr)
        return 2
    plan = Plan(args.smoke)
    os.makedirs(args.out, exist_ok=True)
    report = dict(smoke=args.smoke, command=' '.join([sys.argv[0], *(argv or sys.argv[1:])]),
                  steps={})
    for name in args.steps:
        start = time.perf_counter()
        print(f'[gpu_validate] {name} ...', file=sys.stderr, flush=True)
        try:
            fn = STEPS[name]
            result = fn(plan) if name == 'environment' else fn(plan, args.out)
        except Exception as exc:  # noqa: BLE001 - one step's failure is a row, not the end
            result = dict(ok=False, error=f'{type(exc).__name__}: {exc}',
                          traceback=traceback.format_exc()[-4000:])
        result['seconds'] = time.perf_counter() - start
        report['steps'][name] = result
        print(f"[gpu_validate] {name}: {'ok' if result.get('ok', True) else 'FAILED'} "
              f"({result['seconds']:.1f} s) {result.get('summary', result.get('error', ''))}",
              file=sys.stderr, flush=True)
    report['moved_to_reference'] = _guard_state()
    report['ok'] = all(r.get('ok', True) for r in report['steps'].values())
    with open(osp.join(args.out, 'gpu_validate.json'), 'w') as f:
        json.dump(report, f, indent=1, default=str)
    text = markdown(report)
    with open(osp.join(args.out, 'gpu_validate.md'), 'w') as f:
        f.write(text)
    print(text)
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
