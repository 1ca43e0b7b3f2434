"""Which code runs the windowed cascaded group attention: the one decision point.

Two vocabularies, one per level, with distinct names for distinct code paths:

* the op's ``backend`` (:data:`BACKENDS`, ``cascaded_group_attention(..., backend=)``):
  ``auto``, ``fused``, ``reference`` (:func:`~.cga_reference.cga_reference`, plain PyTorch on
  BN-folded weights), ``cpu`` (C++ extension), ``triton`` (GPU kernels);
* the backbone's ``attn_backend`` (:data:`ATTN_BACKENDS`, configs and
  ``LocalWindowAttention``): the same names, except that ``module`` is the original's module
  path (pad, partition, the ``CascadedGroupAttention`` module with its unfolded Conv+BN,
  reverse) instead of ``reference``. The old config value ``attn_backend='reference'`` meant the
  module path; it still does, with a ``DeprecationWarning`` (:func:`check_attn_backend`).

:func:`plan_attention` is called once per forward (by ``LocalWindowAttention.forward``, or by
the op when called directly) and returns an :class:`AttentionPlan`: what runs, in which
compute dtype, and whether a failing kernel may fall back (``auto``). It is the only place that
looks at the requested name, the tensor, the module's state (BatchNorms training, tracing /
ONNX export) and what this machine can run. Explicit backends that cannot run raise here, with
the reason.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ['BACKENDS', 'ATTN_BACKENDS', 'AttentionPlan', 'plan_attention', 'check_backend',
           'check_attn_backend', 'available_backends', 'cpu_extension_status', 'resolve_backend',
           'compute_dtype']

logger = logging.getLogger('efficientvit_det.ops')

BACKENDS = ('auto', 'fused', 'reference', 'cpu', 'triton')
ATTN_BACKENDS = ('auto', 'fused', 'module', 'cpu', 'triton')
# config values that were renamed: old -> new (each warns once per process)
_DEPRECATED_ATTN_BACKENDS = {'reference': 'module'}

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionPlan:
    """What one forward of the attention runs.

    ``kernel``: ``module`` (the backbone's module path), ``reference``, ``cpu`` or ``triton``.
    ``fallback``: ``auto`` asked for it: a fused kernel that fails (or fails verification) for
    a shape class continues on the reference (``ops/guard.py``); explicit backends raise.
    ``dtype``: the compute dtype (the autocast dtype when autocast is on for the device).
    ``reason``: why this kernel was chosen when it is not the one asked for (for messages).
    """

    kernel: str
    fallback: bool
    dtype: torch.dtype
    reason: str = ''

    @property
    def fused(self) -> bool:
        return self.kernel in ('cpu', 'triton')


def check_backend(backend: str) -> str:
    """``backend`` if it is one of the op's :data:`BACKENDS`, else a ``ValueError``."""
    if backend not in BACKENDS:
        hint = " ('module' is the backbone's module path: attn_backend='module')" \
            if backend == 'module' else ''
        raise ValueError(f'unknown attention backend {backend!r}; choose one of {BACKENDS}{hint}')
    return backend


def check_attn_backend(backend: str) -> str:
    """A config's / the backbone's ``attn_backend``, checked and with renamed values mapped
    (``'reference'`` -> ``'module'``, with a ``DeprecationWarning``); ``ValueError`` if unknown."""
    if backend in _DEPRECATED_ATTN_BACKENDS:
        new = _DEPRECATED_ATTN_BACKENDS[backend]
        warnings.warn(f"attn_backend={backend!r} is deprecated: it is the backbone's module path, "
                      f"now called {new!r} (the op's 'reference' is the plain PyTorch op on "
                      f"folded weights)", DeprecationWarning, stacklevel=3)
        return new
    if backend not in ATTN_BACKENDS:
        raise ValueError(f'unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}')
    return backend


_WARNED: set = set()


def warn_once(message: str, key: Optional[str] = None) -> None:
    """One ``RuntimeWarning`` (and log line) per ``key`` (default: the message) and process."""
    key = message if key is None else key
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def forget_warnings() -> None:
    """Warn again about what was warned about already (tests)."""
    _WARNED.clear()


# ---------------------------------------------------------------------------------------------
# what this machine can run
# ---------------------------------------------------------------------------------------------
_CPU_EXTENSION: list = []  # imported once; a plain cache (torch.compile traces through it)


def cpu_extension() -> Tuple[Optional[ModuleType], str]:
    """The C++ extension and ``isa=...``, or ``None`` and why it is missing (imported once)."""
    if not _CPU_EXTENSION:
        _CPU_EXTENSION.append(_import_cpu_extension())
    return _CPU_EXTENSION[0]


def _import_cpu_extension() -> Tuple[Optional[ModuleType], str]:
    if os.environ.get('EVIT_CGA_DISABLE_CPU_EXT', '0') == '1':
        return None, 'disabled by EVIT_CGA_DISABLE_CPU_EXT=1'
    try:
        ext = importlib.import_module('efficientvit_det.ops._cga_cpu')
    except Exception as exc:  # ImportError, or OSError for an ABI mismatch
        return None, (f'{type(exc).__name__}: {exc} (the extension is built by '
                      '`pip install --no-build-isolation -e .`; a failed build only warns)')
    return ext, f'isa={ext.isa()}'


def cpu_extension_status() -> Tuple[bool, str]:
    """``(available, detail)``: detail is the ISA in use, or why the extension is missing."""
    ext, detail = cpu_extension()
    return ext is not None, detail


def _triton_status(device: torch.device) -> Tuple[bool, str]:
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET', '0') != '1':
        return False, 'triton needs a CUDA tensor (or TRITON_INTERPRET=1 for tests)'
    try:
        import triton  # noqa: F401
    except Exception as exc:  # triton ships with CUDA builds of torch only
        return False, f'triton does not import: {exc}'
    return True, 'interpreter' if device.type != 'cuda' else ''


def _backend_error(name: str, device: torch.device, dtype: torch.dtype) -> Optional[Exception]:
    """Why the fused backend ``name`` (``cpu`` | ``triton``) cannot run a ``dtype`` tensor on
    ``device``, as the exception an explicit request raises; ``None`` when it can."""
    if name == 'cpu':
        ext, why = cpu_extension()
        if ext is None:
            return RuntimeError(f'attention backend "cpu" unavailable: {why}')
        if device.type != 'cpu':
            return ValueError(f'attention backend "cpu" needs CPU tensors, got {device}')
        if dtype not in _CPU_DTYPES:
            return TypeError(f'attention backend "cpu" takes {_CPU_DTYPES}, got {dtype}')
        return None
    ok, why = _triton_status(device)
    if not ok:
        return RuntimeError(f'attention backend "triton" unavailable: {why}')
    if dtype not in _TRITON_DTYPES:
        return TypeError(f'attention backend "triton" takes {_TRITON_DTYPES}, got {dtype}')
    return None


def _fused_for(device: torch.device) -> Optional[str]:
    return {'cuda': 'triton', 'cpu': 'cpu'}.get(device.type)


def available_backends(device='cpu') -> List[str]:
    """Concrete op backends that can run on ``device`` (besides ``auto`` and ``fused``)."""
    device = torch.device(device)
    out = ['reference']
    if device.type == 'cpu' and cpu_extension()[0] is not None:
        out.append('cpu')
    if _triton_status(device)[0]:
        out.append('triton')
    return out


def _in_trace_or_export() -> bool:
    """TorchScript tracing / scripting or ONNX export: the graph must be plain ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return bool(torch.onnx.is_in_onnx_export())


def compute_dtype(x: Tensor) -> torch.dtype:
    """``x``'s dtype, or the autocast dtype when autocast is on for its device (the op casts
    ``x`` to it, as the reference's first conv would; autocast leaves float64 alone)."""
    if x.is_floating_point() and x.dtype != torch.float64 \
            and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------
def plan_attention(backend: str, x: Tensor, bn_training: Optional[bool] = None) -> AttentionPlan:
    """The plan of one forward of the attention on ``x``.

    Args:
        backend: the requested name; with ``bn_training`` given (called by the backbone's
            ``LocalWindowAttention``) one of :data:`ATTN_BACKENDS` as :func:`check_attn_backend`
            returns it, else (the op called directly) one of :data:`BACKENDS`.
        x: the input map.
        bn_training: whether the attention's BatchNorms use batch statistics (folded weights
            are then wrong); ``None`` when there is no module path (the op called directly).

    Rules: ``module`` -> the module path. Tracing / ONNX export: the module path in the
    backbone (plain ops that export), ``reference`` in the op. Training BatchNorms: ``auto`` ->
    the module path, explicit backends raise. ``auto`` -> the fused kernel of the device when it
    can run the compute dtype, else ``reference`` (a warning if the C++ extension is missing);
    ``fused`` / ``cpu`` / ``triton`` raise with the reason when they cannot run.
    """
    module_level = bn_training is not None
    vocabulary = ATTN_BACKENDS if module_level else BACKENDS
    if backend not in vocabulary:
        (check_attn_backend if module_level else check_backend)(backend)  # raises
    dtype = compute_dtype(x)
    auto = backend == 'auto'
    if backend == 'module':
        return AttentionPlan('module', False, dtype)
    if backend == 'reference':
        return AttentionPlan('reference', False, dtype)
    if _in_trace_or_export():
        if module_level:
            return AttentionPlan('module', False, dtype, 'tracing / ONNX export')
        if auto:
            return AttentionPlan('reference', False, dtype, 'tracing / ONNX export')
    if module_level and bn_training:
        if not auto:
            raise RuntimeError(f'attn_backend={backend!r} needs the attention BatchNorms in eval '
                               "mode (norm_eval=True or model.eval()); use attn_backend='auto'")
        return AttentionPlan('module', False, dtype, 'attention BatchNorms in training mode')
    name = backend if backend in ('cpu', 'triton') else _fused_for(x.device)
    error = (_backend_error(name, x.device, dtype) if name is not None else
             RuntimeError(f'no fused attention kernel for {x.device.type} tensors'))
    if error is None:
        return AttentionPlan(name, auto, dtype)
    if not auto:
        if backend == 'fused':
            raise RuntimeError(f'attention backend "fused" cannot run here: {error}')
        raise error
    if x.device.type == 'cpu' and dtype in _CPU_DTYPES:  # the extension should be there
        warn_once(f'efficientvit_det: fused attention C++ kernel unavailable, using the PyTorch '
                  f'reference instead ({error})')
    return AttentionPlan('reference', False, dtype, str(error))


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete op backend (``reference``, ``cpu`` or ``triton``) that would run ``x``."""
    return plan_attention(backend, x).kernel
