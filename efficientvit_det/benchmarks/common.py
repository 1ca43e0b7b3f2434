"""Timing, memory and reporting utilities shared by the benchmark sub-commands.

Rules these helpers enforce (REFERENCE.md section 5, measured on 2-core machines):

* Competitors are timed **interleaved in one process** (every repeat runs every case once, the
  order rotating between repeats), so load from other processes and slow drifts hit all of them
  alike; report ratios of medians, not absolute numbers from separate runs.
* Warm up with full passes of every case before timing, the largest first: glibc returns big
  freed blocks to the OS until its mmap threshold adapts, and a cold process measures the same
  call up to 2x slower.
* On CUDA every sample is bracketed by ``torch.cuda.synchronize()``.
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

__all__ = [
    'add_common_args', 'setup_from_args', 'resolve_device', 'synchronize', 'Progress',
    'time_interleaved', 'summarize', 'format_table', 'machine_info', 'write_json',
    'max_rel_err', 'randomize_', 'calibrate_bn_', 'peak_memory', 'resolve_detector_config',
    'build_detector_from_config', 'run_isolated', 'fmt_ms', 'saved_tensor_bytes',
]


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
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available here (use --device cpu or auto)')
    return torch.device(name)


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
                     label: str = '', allocator_warmup: Optional[Callable[[], Any]] = None
                     ) -> Dict[str, Dict[str, Any]]:
    """Time every case ``repeats`` times, interleaved; return :func:`summarize` per case.

    ``allocator_warmup`` (e.g. the largest model at the largest input) runs once before
    everything else; then each case runs ``warmup`` untimed times (at least once). Repeat ``r``
    runs the cases starting at offset ``r`` (rotation), so none is always first after a pause.
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
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect(0)
            synchronize(device)
            t0 = time.perf_counter()
            cases[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - t0)
            progress.update(f'[{label}] repeat {r + 1}/{repeats}: {name} '
                            f'{samples[name][-1] * 1e3:.1f} ms')
    return {n: summarize(s) for n, s in samples.items()}


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


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for ln in f:
                if ln.lower().startswith('model name'):
                    return ln.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = dict(cpu=_cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
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
# models and outputs
# --------------------------------------------------------------------------------------------
def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| over a tensor or a sequence of tensors (worst entry)."""
    if isinstance(actual, torch.Tensor):
        actual, expected = [actual], [expected]
    worst = 0.
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return float('inf')
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        worst = max(worst, (a - e).abs().max().item() / max(e.abs().max().item(), 1e-12))
    return worst


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, branch_scale: float = 0.1) -> nn.Module:
    """Give every parameter and BN statistic non-trivial values (zero-init branches would make
    output comparisons vacuous; timing is unaffected).

    Norm weights that are all zero before this call (the zero-initialised last BN of residual
    branches) get ``branch_scale`` times the usual random weight: with full-size branches a
    random deep residual net is chaotic (float32 rounding alone moves its stage-3 output by
    percents), whereas trained networks keep those branches small.
    """
    g = torch.Generator().manual_seed(seed)
    zero_init = {name for name, p in model.named_parameters()
                 if name.endswith('weight') and p.dim() == 1 and not p.any()}
    for name, p in model.named_parameters():
        if name.endswith('attention_biases'):
            p.copy_(torch.randn(p.shape, generator=g).to(p))
        elif p.dim() > 1:
            p.copy_((torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5).to(p))
        elif name.endswith('weight'):
            scale = branch_scale if name in zero_init else 1.
            p.copy_(((torch.rand(p.shape, generator=g) + 0.5) * scale).to(p))
        else:
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_((torch.randn(m.running_mean.shape, generator=g) * 0.1).to(m.running_mean))
            m.running_var.copy_((torch.rand(m.running_var.shape, generator=g) + 0.5).to(m.running_var))
    return model


@torch.no_grad()
def calibrate_bn_(model: nn.Module, forward: Callable[[], Any]) -> nn.Module:
    """Set every BatchNorm's running statistics to those of one ``forward()`` batch.

    Random BN statistics let activations grow by orders of magnitude through the residual
    stages (stage-3 maps of ~1e5 with :func:`randomize_` alone), where float32 itself is no
    longer reproducible (float32 vs float64 of the *same* module differ by ~50%) and an
    equal-output check means nothing. Calibrated statistics keep the maps O(1), like trained
    weights do. Leaves the model in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
        m.train()
    try:
        forward()
    finally:
        for m, (mom, _) in zip(bns, saved):
            m.momentum = mom
    return model.eval()


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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, 'configs', f'retinanet_efficientvit_{name}_coco.py')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} not found: pass a config path instead of {name!r}')
        return path
    if not os.path.isfile(name):
        raise FileNotFoundError(f'detector config {name!r} not found')
    return name


def build_detector_from_config(config: str, device='cpu', attn_impl: Optional[str] = None,
                               cfg_options: Optional[dict] = None) -> nn.Module:
    """Build a detector from a config with no pretrained downloads; eval mode, on ``device``."""
    import efficientvit_det  # noqa: F401  (registers our modules)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    cfg = Config.fromfile(resolve_detector_config(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.backbone.init_cfg = None  # nothing to download or load
    if attn_impl is not None and cfg.model.backbone.type == 'EfficientViT':
        cfg.model.backbone.attn_impl = attn_impl
    model = MODELS.build(cfg.model)
    model.cfg = cfg
    return model.to(device).eval()


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
    except Exception:  # noqa: BLE001 - timeout or a dead child
        proc.kill()
        proc.join()
        raise RuntimeError(f'{target} did not report back (exit code {proc.exitcode})')
    proc.join()
    if status != 'ok':
        raise RuntimeError(f'{target} failed in its subprocess:\n{result}')
    return result


def saved_tensor_bytes(call: Callable[[], Any], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``call()`` runs, each storage counted once and
    the storages of ``exclude`` (inputs, weights: they exist anyway) not at all."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return total
