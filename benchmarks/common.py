"""Timing, memory and reporting utilities shared by the benchmark sub-commands.

Rules these helpers enforce (measured on 2-core machines, docs/facts.md "Measuring"):

* Competitors are timed **interleaved in one process** (every repeat runs every case once, the
  order rotating between repeats), so load from other processes and slow drifts hit all of them
  alike; report ratios of medians, not absolute numbers from separate runs.
* Warm up with full passes of every case before timing, the largest first: glibc returns big
  freed blocks to the OS until its mmap threshold adapts, and a cold process measures the same
  call up to 2x slower.
* On CUDA every sample is timed with CUDA events between two ``torch.cuda.synchronize()``.
* Median and spread (quartiles, min/max) of the per-repeat samples are reported.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS (``VmHWM``,
reset through ``/proc/self/clear_refs``) in a fresh subprocess, see :func:`run_isolated`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from efficientvit_det.archs import ARCH_SETTINGS

__all__ = [
    'add_common_args', 'setup_from_args', 'resolve_device', 'synchronize', 'Progress',
    'time_interleaved', 'summarize', 'format_table', 'machine_info', 'write_json',
    'peak_memory', 'resolve_detector_config', 'build_detector_from_config', 'run_isolated',
    'fmt_ms', 'report', 'stage_shapes', 'M4_STAGES', 'M4_HEADS', 'M4_KERNELS',
]


# --------------------------------------------------------------------------------------------
# the attention shapes of a detector input
# --------------------------------------------------------------------------------------------
def stage_shapes(arch: str = 'm4', height: int = 800, width: int = 1344):
    """``[(name, C, H, W)]`` of the three attention stages of ``arch`` for a
    ``height x width`` input (strides 16, 32, 64; each stride-2 conv rounds up)."""
    out, h, w = [], height, width
    for _ in range(4):  # the stem
        h, w = -(-h // 2), -(-w // 2)
    for i, dim in enumerate(ARCH_SETTINGS[arch]['embed_dims']):
        if i:
            h, w = -(-h // 2), -(-w // 2)
        out.append((f'stage{i + 1}', dim, h, w))
    return out


# m4 at 800x1344: [('stage1', 128, 50, 84), ('stage2', 256, 25, 42), ('stage3', 384, 13, 21)]
M4_STAGES = stage_shapes('m4')
M4_HEADS = ARCH_SETTINGS['m4']['num_heads'][0]  # the same in every m4 stage
M4_KERNELS = ARCH_SETTINGS['m4']['kernels']


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, repeats: int = 10, warmup: int = 2) -> None:
    g = parser.add_argument_group('timing')
    g.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='auto = cuda when available, else cpu (default: %(default)s)')
    g.add_argument('--repeats', type=int, default=repeats,
                   help='timed repeats per case, interleaved (default: %(default)s)')
    g.add_argument('--warmup', type=int, default=warmup,
                   help='untimed passes of every case before timing (default: %(default)s)')
    g.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch default)')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--json', metavar='FILE', default=None, help='also write the results as JSON')
    g.add_argument('--quiet', action='store_true', help='no progress line on stderr')


def setup_from_args(args: argparse.Namespace) -> torch.device:
    if args.repeats < 1:
        raise SystemExit('--repeats must be >= 1')
    if args.warmup < 0:
        raise SystemExit('--warmup must be >= 0')
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return resolve_device(args.device)


def resolve_device(name: str = 'auto') -> torch.device:
    """``--device`` as a torch device (:func:`efficientvit_det.apis.resolve_device`'s rules);
    a device that is not there ends the benchmark with the reason."""
    from efficientvit_det.apis import resolve_device as resolve
    try:
        return torch.device(resolve(name))
    except ValueError as exc:
        raise SystemExit(f'--device {name}: {exc}') from None


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class Progress:
    """One self-overwriting progress line on stderr (a new line per update when not a tty)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, 'isatty', lambda: False)()
        self._last = 0.
        self._width = 0

    def update(self, msg: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and not force and now - self._last < 2.0:
            return  # logs: at most one line every 2 s
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(msg))
            self.stream.write('\r' + msg + ' ' * pad)
            self._width = len(msg)
        else:
            self.stream.write(msg + '\n')
        self.stream.flush()

    def done(self, msg: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if msg:
            self.update(msg, force=True)
        if self.tty and self._width:
            self.stream.write('\n')
            self.stream.flush()
        self._width = 0


def summarize(samples_s: Sequence[float]) -> Dict[str, Any]:
    """Median and spread of timing samples (seconds in, milliseconds out)."""
    ms = sorted(s * 1e3 for s in samples_s)
    n = len(ms)

    def q(p: float) -> float:  # linear interpolation between order statistics
        if n == 1:
            return ms[0]
        pos = p * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (pos - lo)

    return dict(n=n, median_ms=statistics.median(ms), mean_ms=statistics.fmean(ms),
                q1_ms=q(.25), q3_ms=q(.75), iqr_ms=q(.75) - q(.25), min_ms=ms[0], max_ms=ms[-1],
                samples_ms=[round(v, 4) for v in ms])


def time_interleaved(cases: Dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     device: torch.device, progress: Optional[Progress] = None,
                     label: str = '', allocator_warmup: Optional[Callable[[], Any]] = None,
                     cpu_clock: bool = False) -> Dict[str, Dict[str, Any]]:
    """Time every case ``repeats`` times, interleaved; return :func:`summarize` per case.

    ``allocator_warmup`` (e.g. the largest model at the largest input) runs once before
    everything else; then each case runs ``warmup`` untimed times (at least once). Repeat ``r``
    runs the cases starting at offset ``r`` (rotation), so none is always first after a pause.

    ``cpu_clock`` (CPU only) also times each sample on the process CPU clock and adds
    ``cpu_median_ms``, ``cpu_q1_ms``, ``cpu_q3_ms``, ``cpu_min_ms``, ``cpu_samples_ms``: on a
    shared machine a descheduled process loses wall time but not CPU time, so with one thread
    the CPU-time medians compare the cases' own work (with more threads they also count idle
    OpenMP workers spinning).
    """
    names = list(cases)
    progress = progress or Progress(enabled=False)
    if allocator_warmup is not None:
        progress.update(f'[{label}] warming the allocator', force=True)
        allocator_warmup()
        synchronize(device)
    for w in range(max(warmup, 1)):
        for name in names:
            progress.update(f'[{label}] warm-up {w + 1}/{max(warmup, 1)}: {name}')
            cases[name]()
            synchronize(device)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect(0)
            c0 = time.process_time()
            samples[name].append(_time_once(cases[name], device))
            cpu[name].append(time.process_time() - c0)
            progress.update(f'[{label}] repeat {r + 1}/{repeats}: {name} '
                            f'{samples[name][-1] * 1e3:.1f} ms')
    out = {n: summarize(s) for n, s in samples.items()}
    if cpu_clock:
        for n in names:
            c = summarize(cpu[n])
            out[n].update(cpu_median_ms=c['median_ms'], cpu_q1_ms=c['q1_ms'],
                          cpu_q3_ms=c['q3_ms'], cpu_min_ms=c['min_ms'],
                          cpu_samples_ms=c['samples_ms'])
    return out


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on the GPU (what the kernels took, launch queue
    drained before and after), the wall clock on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_ms(stats: Dict[str, Any]) -> str:
    """'12.3 (11.9-12.8)': median and interquartile range."""
    m = stats['median_ms']
    digits = 1 if m >= 10 else 2
    return f"{m:.{digits}f} ({stats['q1_ms']:.{digits}f}-{stats['q3_ms']:.{digits}f})"


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'  # noqa: E731
    out = [line([str(h) for h in headers]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    out += [line(r) for r in rows]
    return '\n'.join(out)


def machine_info(device: torch.device) -> Dict[str, Any]:
    from efficientvit_det.cpu import cpu_info
    info = dict(cpu=cpu_info().describe(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), device=str(device))
    try:
        info['load_avg_at_start'] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    try:
        from efficientvit_det.ops import available_backends, cpu_extension_status
        info['cga_backends'] = available_backends(device)
        info['cga_cpu_extension'] = cpu_extension_status()[1]
    except Exception as exc:  # noqa: BLE001 - the op may be missing while it is written
        info['cga_backends'] = f'unavailable: {exc}'
    return info


def report(payload: Dict[str, Any], args: argparse.Namespace, device: torch.device,
           render: Callable[[Dict[str, Any]], str]) -> Dict[str, Any]:
    """The end of every benchmark: machine and arguments into ``payload``, the table printed,
    ``--json`` written; returns ``payload``."""
    payload['machine'] = machine_info(device)
    payload['args'] = vars(args)
    print(render(payload))
    write_json(args.json, payload)
    return payload


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2, default=str)
        f.write('\n')
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------
MMDET_R50_CONFIG = 'retinanet/retinanet_r50_fpn_1x_coco.py'


def resolve_detector_config(name: str) -> str:
    """'m4' / 'r50' / a config path -> a config path."""
    if name == 'r50':
        import mmdet
        return os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', MMDET_R50_CONFIG)
    if name in ('m0', 'm1', 'm2', 'm3', 'm4', 'm5'):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
        path = os.path.join(root, 'configs', f'retinanet_efficientvit_{name}_coco.py')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} not found: pass a config path instead of {name!r}')
        return path
    if not os.path.isfile(name):
        raise FileNotFoundError(f'detector config {name!r} not found')
    return name


def build_detector_from_config(config: str, device='cpu', attn_backend: Optional[str] = None,
                               cfg_options: Optional[dict] = None) -> nn.Module:
    """A detector from a config (``m0``..``m5``, ``r50`` or a path), random initial weights,
    nothing downloaded or loaded; eval mode, on ``device``."""
    from efficientvit_det.apis import init_detector
    model = init_detector(resolve_detector_config(config), None, device, cfg_options)
    if attn_backend is not None and hasattr(model.backbone, 'set_attn_backend'):
        model.backbone.set_attn_backend(attn_backend)
    return model


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open('/proc/self/status') as f:
            for ln in f:
                if ln.startswith(field + ':'):
                    return int(ln.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """Run ``fn`` once and return its peak memory above what was held before it.

    CUDA: ``max_memory_allocated`` (tensors only). CPU: peak RSS (VmHWM) minus RSS before the
    call, which counts everything the process touches (allocator caches included); meaningful
    in a fresh process (:func:`run_isolated`), where freed-but-cached memory does not hide the
    peak.
    """
    gc.collect()
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(method='torch.cuda.max_memory_allocated', peak_mb=peak / 2**20,
                    base_mb=base / 2**20, peak_delta_mb=(peak - base) / 2**20)
    base_kb = _proc_status_kb('VmRSS')
    reset = _reset_peak_rss()
    if base_kb is None:  # not Linux: ru_maxrss of the process (KiB on Linux, bytes on macOS)
        import resource
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / (2**20 if sys.platform == 'darwin' else 2**10)
        return dict(method='ru_maxrss (process peak)', peak_mb=peak_mb, base_mb=None,
                    peak_delta_mb=None)
    fn()
    peak_kb = _proc_status_kb('VmHWM')
    method = 'VmHWM after clear_refs' if reset else 'VmHWM (process peak)'
    return dict(method=method, peak_mb=peak_kb / 1024, base_mb=base_kb / 1024,
                peak_delta_mb=(peak_kb - base_kb) / 1024)


def _isolated_entry(queue, target: str, kwargs: dict) -> None:
    try:
        import importlib
        mod_name, fn_name = target.split(':')
        fn = getattr(importlib.import_module(mod_name), fn_name)
        queue.put(('ok', fn(**kwargs)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        import traceback
        queue.put(('error', f'{type(exc).__name__}: {exc}\n{traceback.format_exc()}'))


def run_isolated(target: str, timeout: float = 1800, **kwargs) -> Any:
    """Call ``module:function(**kwargs)`` in a fresh (spawned) Python process; return its result.

    Used for CPU peak-memory measurements, which need a process with no history.
    """
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_isolated_entry, args=(queue, target, kwargs))
    proc.start()
    try:
        status, result = queue.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - timeout or a dead child
        proc.kill()
        proc.join()
        raise RuntimeError(f'{target} did not report back (exit code {proc.exitcode})') from exc
    proc.join()
    if status != 'ok':
        raise RuntimeError(f'{target} failed in its subprocess:\n{result}')
    return result
