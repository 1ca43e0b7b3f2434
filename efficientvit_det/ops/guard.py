"""The safety net of the fused kernels under ``auto``: fallback, failure policy, verification.

It runs *inside* the registered op's implementations (``torch.ops.efficientvit_det.cga`` and
``cga_backward``, :mod:`.cga`), so it holds wherever the op runs: eager, autograd, autocast,
``torch.compile`` (the op is one opaque node of the compiled graph; its implementation, and so
this code, runs at every call) and DDP. Explicit backends (``cpu``, ``triton``, ``fused``) do not
come here: they raise.

Shape class: ``(backend, dtype, C, heads, K)``; every call of one class runs the same compiled
kernels (every other size is a runtime argument), so a deterministic failure or a wrong result
holds for the whole class.

Failure policy (per class, forward and backward counted separately; docs/triton.md):

* out of memory (``torch.OutOfMemoryError``, ``MemoryError``, or a message with "out of
  memory") is not a kernel failure: the reference would need more memory still. It propagates
  and changes nothing.
* an input too large for the kernels' 32-bit offsets (:class:`InputTooLargeError`): this call
  runs the reference; the class stays on the kernel.
* a deterministic failure (the kernel does not build, compile or launch: Triton's compiler and
  runtime errors, a missing module, an unsupported type): the class moves to the reference at
  once.
* any other error: this call runs the reference; the class moves to the reference after
  :data:`MAX_FAILURES` consecutive failures (a success resets the count), so one transient
  error does not cost the fast path for the rest of the run.
* a result that fails verification: the class moves to the reference at once (a forward
  mismatch moves its backward too: it recomputes the same forward).

Each event warns once per class, direction and kind of error, naming the class as
``(dtype, C, heads, K)`` and the reason.

Verification on first use (:func:`verify_enabled`): the first forward and the first backward of
each class also run the reference on the same inputs and compare (:func:`bounds`): float32 /
float64 classes against the reference in their dtype with a fixed bound (:func:`tolerance`),
float16 / bfloat16 classes against the reference in float32, allowing twice the error of the
reference computed in the same half precision plus a floor (:data:`HALF_FLOOR`). A mismatch
warns with the measured error and moves the class to the reference (that call returns the
reference's result), a match is logged once. Default: on for CUDA tensors; ``EVIT_CGA_VERIFY=0``
turns it off, ``EVIT_CGA_VERIFY=1`` turns it on everywhere (CPU kernels too).

The reference runs in the dtypes the forward used (:func:`reference_forward`): a half-precision
``x`` with float32 weights (autocast) runs under autocast in ``x``'s dtype, as the reference does
under AMP; otherwise every weight is cast to ``x``'s dtype. Its gradients come from PyTorch's
autograd through that same computation, each in its input's dtype.
"""
from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .cga_reference import cga_reference
from .dispatch import forget_warnings, warn_once

__all__ = ['InputTooLargeError', 'MAX_FAILURES', 'VERIFY_TOLERANCE', 'HALF_FLOOR', 'guarded_forward',
           'guarded_backward', 'GRAD_NAMES', 'bounds', 'reference_forward', 'reference_grads', 'tolerance',
           'verify_enabled', 'compare', 'reset', 'class_state', 'shape_class']

logger = logging.getLogger('efficientvit_det.ops')

MAX_FAILURES = 3
# Verification bounds on max |kernel - reference| / max |reference| (output, each gradient).
# float32 / float64 classes: against the reference in the same dtype, fixed bounds (float32 on
# CUDA: TF32 may be on in cuDNN's convolutions and in the kernels' matmuls).
VERIFY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
CUDA_FP32_TOLERANCE = 1e-2
# float16 / bfloat16 classes: against the reference in float32, at most twice as far as the
# reference computed in the same half precision (the rounding any correct half-precision
# implementation has), plus this floor.
HALF_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
_DIRECTIONS = ('forward', 'backward')
GRAD_NAMES = ('x', 'qkv_weight', 'qkv_bias', 'dw_weight', 'dw_bias', 'attn_bias', 'proj_weight',
               'proj_bias')


class InputTooLargeError(ValueError):
    """This input does not fit a kernel's limits (e.g. 32-bit offsets); other sizes of its
    class still do, so only this call runs the reference."""


@dataclass
class ClassState:
    """What is known about one shape class in this process."""

    disabled: Dict[str, str] = field(default_factory=dict)  # direction -> reason
    failures: Dict[str, int] = field(default_factory=dict)  # consecutive, per direction
    verified: Dict[str, float] = field(default_factory=dict)  # direction -> measured error


_STATE: Dict[tuple, ClassState] = {}


def shape_class(backend: str, x: Tensor, qkv_weight: Tensor, dw_weight: Tensor) -> tuple:
    """``(backend, dtype, C, heads, K)``."""
    return backend, x.dtype, int(x.shape[1]), int(qkv_weight.shape[0]), int(dw_weight.shape[-1])


def _label(cls: tuple) -> str:
    return f'(dtype, C, heads, K)=({cls[1]}, {cls[2]}, {cls[3]}, {cls[4]})'


def class_state(cls: tuple) -> ClassState:
    return _STATE.setdefault(cls, ClassState())


def reset() -> None:
    """Forget every class's state and the warnings given (tests)."""
    _STATE.clear()
    forget_warnings()
    _log_once.cache_clear()


def verify_enabled(device: torch.device) -> bool:
    """``EVIT_CGA_VERIFY``: ``1`` on, ``0`` off, unset: on for CUDA tensors only."""
    value = os.environ.get('EVIT_CGA_VERIFY', '').strip()
    if value in ('0', '1'):
        return value == '1'
    return device.type == 'cuda'


def tolerance(dtype: torch.dtype, device: Optional[torch.device] = None) -> float:
    """The fixed verification bound of a float32 / float64 class (half precision:
    :data:`HALF_FLOOR` plus twice the reference's own error, see :func:`bounds`)."""
    if dtype == torch.float32 and device is not None and device.type == 'cuda':
        return CUDA_FP32_TOLERANCE
    return VERIFY_TOLERANCE.get(dtype, HALF_FLOOR.get(dtype, 1e-2))


def _upcast(args: Sequence[Tensor]) -> List[Tensor]:
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in args]


def bounds(outputs: Dict[str, Tensor], refs: Dict[str, Tensor], exact: Optional[Dict[str, Tensor]],
           dtype: torch.dtype, device: torch.device) -> Dict[str, Tuple[float, float]]:
    """``{name: (error, bound)}`` of each kernel output: against ``refs`` (the reference in
    ``dtype``) with :func:`tolerance`, or, for half precision, against ``exact`` (the reference
    in float32) with ``2 * error(refs) + HALF_FLOOR``. Outputs that prove nothing are left out."""
    out = {}
    for name, value in outputs.items():
        if exact is None:
            err, bound = compare(value, refs[name]), tolerance(dtype, device)
        else:
            err, ref_err = compare(value, exact[name]), compare(refs[name], exact[name])
            bound = None if ref_err is None else 2 * ref_err + HALF_FLOOR[dtype]
        if err is not None and bound is not None:
            out[name] = (err, bound)
    return out


def compare(actual: Tensor, expected: Tensor) -> Optional[float]:
    """``max |a - e| / max |e|``; ``inf`` if ``actual`` is not finite where ``expected`` is or
    the shapes differ; ``None`` when it proves nothing (no elements, or a non-finite reference)."""
    if actual.shape != expected.shape:
        return float('inf')
    if expected.numel() == 0:
        return None
    e = expected.detach().double()
    if not torch.isfinite(e).all():
        return None
    a = actual.detach().double()
    if not torch.isfinite(a).all():
        return float('inf')
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()




@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) \
        or 'out of memory' in str(exc).lower()


def _is_deterministic(exc: BaseException) -> bool:
    """The kernel cannot build, compile or launch for this class: it will not work next time."""
    module = type(exc).__module__ or ''
    return module.startswith('triton') or isinstance(
        exc, (ImportError, NotImplementedError, TypeError, AttributeError))


# ---------------------------------------------------------------------------------------------
# the reference, in the dtypes the forward used
# ---------------------------------------------------------------------------------------------
def reference_forward(args: Sequence[Tensor], meta: Tuple[int, int, float]) -> Tensor:
    """:func:`cga_reference` on ``args`` in ``x``'s dtype, independent of the caller's autocast
    state (so a backward outside autocast recomputes what the forward computed inside it):
    half-precision ``x`` with other weights -> under autocast to ``x``'s dtype (the reference
    under AMP); otherwise every weight cast to ``x``'s dtype, autocast off."""
    x, weights = args[0], list(args[1:])
    dt, dev = x.dtype, x.device.type
    if dt in (torch.float16, torch.bfloat16) and any(w.dtype != dt for w in weights):
        ctx = torch.autocast(dev, dtype=dt)
    else:
        ctx = torch.autocast(dev, enabled=False) if dev in ('cpu', 'cuda') else nullcontext()
        weights = [w.to(dt) for w in weights]
    with ctx:
        return cga_reference(x, *weights, *meta).to(dt)


@contextmanager
def _autograd_on():
    """Autograd inside a registered op's implementation: the dispatcher runs it below the
    autograd keys (and the autograd engine without grad mode), so both are turned back on."""
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch.enable_grad():
        yield


def reference_grads(grad_y: Tensor, args: Sequence[Tensor],
                    meta: Tuple[int, int, float]) -> List[Tensor]:
    """Gradients of every input of :func:`reference_forward`, each in its input's dtype."""
    with _autograd_on():
        leaves = [t.detach().requires_grad_(True) for t in args]
        y = reference_forward(leaves, meta)
        grads = torch.autograd.grad(y, leaves, grad_y.to(y.dtype), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g.to(t.dtype).contiguous()
            for g, t in zip(grads, args)]


# ---------------------------------------------------------------------------------------------
# the guarded calls
# ---------------------------------------------------------------------------------------------
def _disable(cls: tuple, direction: str, reason: str) -> None:
    state = class_state(cls)
    for d in (_DIRECTIONS if direction == 'forward' else (direction,)):
        state.disabled.setdefault(d, reason)


def _on_failure(cls: tuple, direction: str, exc: BaseException) -> None:
    """Apply the failure policy to ``exc`` (re-raises out-of-memory errors)."""
    if _is_oom(exc):
        raise exc
    what = f'{type(exc).__name__}: {exc}'
    state = class_state(cls)
    if isinstance(exc, InputTooLargeError):
        action = 'this call runs the PyTorch reference (other sizes keep the kernel)'
    else:
        count = state.failures[direction] = state.failures.get(direction, 0) + 1
        if _is_deterministic(exc) or count >= MAX_FAILURES:
            _disable(cls, direction, what)
            action = ('this shape class runs the PyTorch reference from now on'
                      + ('' if _is_deterministic(exc) else f' ({count} failures in a row)'))
        else:
            action = (f'this call runs the PyTorch reference (failure {count} of '
                      f'{MAX_FAILURES} in a row before the class moves to it)')
    key = f'{cls[0]} {direction} {_label(cls)} {type(exc).__name__}'
    warn_once(f'efficientvit_det: the {cls[0]} attention {direction} kernel failed for '
              f'{_label(cls)}: {what}; {action}', key=key)


def _verify(cls: tuple, direction: str, checks: Dict[str, Tuple[float, float]]) -> bool:
    """Record a verification (``checks`` from :func:`bounds`); ``False``, and the class moved
    to the reference, on a mismatch."""
    if not checks:
        return True  # nothing to compare (empty or non-finite reference): verify next time
    worst = max(checks, key=lambda k: checks[k][0] / checks[k][1])
    err, bound = checks[worst]
    what = f'the {cls[0]} attention {direction} kernel for {_label(cls)}'
    if not err <= bound:  # also catches nan
        _disable(cls, direction, f'{worst} off by {err:.3g} (bound {bound:.3g})')
        warn_once(f'efficientvit_det: {what} disagrees with the PyTorch reference: max relative '
                  f'error {err:.3g} in {worst} (bound {bound:.3g}); this shape class runs the '
                  f'reference from now on', key=f'{cls[0]} {direction} {_label(cls)} mismatch')
        return False
    class_state(cls).verified[direction] = err
    _log_once(f'efficientvit_det: verified {what} against the PyTorch reference: max relative '
              f'error {err:.2g} in {worst} (bound {bound:.2g})')
    return True


def _half(dtype: torch.dtype) -> bool:
    return dtype in HALF_FLOOR


def guarded_forward(backend: str, kernel: Callable[..., Tensor], args: Sequence[Tensor],
                    meta: Tuple[int, int, float]) -> Tensor:
    """``kernel(*args, *meta)`` under the policy of this module, else the reference."""
    cls = shape_class(backend, args[0], args[1], args[3])
    state = class_state(cls)
    if 'forward' in state.disabled:
        return reference_forward(args, meta)
    try:
        y = kernel(*args, *meta)
    except Exception as exc:  # noqa: BLE001 - the optional kernel; OOM re-raised inside
        _on_failure(cls, 'forward', exc)
        return reference_forward(args, meta)
    state.failures['forward'] = 0
    x = args[0]
    if 'forward' not in state.verified and verify_enabled(x.device):
        ref = reference_forward(args, meta)
        exact = {'output': reference_forward(_upcast(args), meta)} if _half(x.dtype) else None
        if not _verify(cls, 'forward', bounds({'output': y}, {'output': ref}, exact, x.dtype,
                                              x.device)):
            return ref
    return y


def guarded_backward(backend: str, kernel: Callable[..., Sequence[Tensor]], grad_y: Tensor,
                     args: Sequence[Tensor], meta: Tuple[int, int, float]) -> List[Tensor]:
    """``kernel(grad_y, *args, *meta)`` under the policy of this module, else the reference's
    gradients; each gradient in its input's dtype."""
    cls = shape_class(backend, args[0], args[1], args[3])
    state = class_state(cls)
    if 'backward' in state.disabled:
        return reference_grads(grad_y, args, meta)
    try:
        grads = [g.to(t.dtype).contiguous() for g, t in zip(kernel(grad_y, *args, *meta), args)]
    except Exception as exc:  # noqa: BLE001 - the optional kernel; OOM re-raised inside
        _on_failure(cls, 'backward', exc)
        return reference_grads(grad_y, args, meta)
    state.failures['backward'] = 0
    x = args[0]
    if 'backward' not in state.verified and verify_enabled(x.device):
        ref = reference_grads(grad_y, args, meta)
        names = [f'grad {n}' for n in GRAD_NAMES]
        exact = dict(zip(names, reference_grads(grad_y.float(), _upcast(args), meta))) \
            if _half(x.dtype) else None
        if not _verify(cls, 'backward', bounds(dict(zip(names, grads)), dict(zip(names, ref)),
                                               exact, x.dtype, x.device)):
            return ref
    return grads
