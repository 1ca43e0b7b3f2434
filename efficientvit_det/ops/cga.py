"""The public fused windowed cascaded group attention (CGA) op and its backend dispatch.

``cascaded_group_attention`` computes the whole windowed CGA block of EfficientViT straight
from an NCHW map, with BatchNorms folded into the weights: implicit zero padding to a multiple
of the window, window partition, per head the 1x1 qkv conv, the depthwise conv on q (zero at
window borders), scaled scores plus the (|dy|, |dx|) bias table, softmax, cascade into the next
head, then ReLU, the 1x1 projection, un-partition and crop (docs/design.md, "The op"). The
residual add is not part of the op.

Backends (one vocabulary, :data:`BACKENDS`, from the backbone's config to here)
--------------------------------------------------------------------------------
``reference``  plain PyTorch (:mod:`.cga_reference`), the oracle; autograd by PyTorch.
``cpu``        C++ extension ``efficientvit_det.ops._cga_cpu`` built at install time (CPU
               tensors: float32, float64, bfloat16 activations with bfloat16 or float32
               weights; on AVX512-BF16 CPUs the bf16 forward runs its matmuls as bf16 dot
               products with float32 accumulation). The backward recomputes each
               window's forward, so nothing per window is stored between forward and backward.
``triton``     Triton kernels (:mod:`.cga_triton`) for CUDA tensors (float32, float16,
               bfloat16); on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
``fused``      the fused kernel of the tensor's device (``cpu`` or ``triton``); raises if it
               cannot run.
``auto``       ``fused`` where it can run for the device and dtype, else ``reference``; if the
               fused kernel fails to build, compile or launch for a shape class and dtype, that
               class runs ``reference`` from then on, with one warning giving the reason: an
               optional fast path never kills a training run. Tracing / ONNX export ->
               ``reference`` (plain ops that export).

``cpu`` and ``triton`` run as one registered torch op, ``torch.ops.efficientvit_det.cga``
(``torch.library.custom_op`` with a fake implementation and an autograd formula that calls
``torch.ops.efficientvit_det.cga_backward``), so ``torch.compile`` and ``torch.export`` see
one node. It saves only its inputs for backward; gradients are not differentiable twice.

Under autocast the input is cast to the autocast dtype, as the reference's first conv would
do; the weights stay in their dtype (float32 folded BatchNorms) and the kernels accumulate in
float32.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from types import ModuleType
from typing import List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .cga_reference import cga_reference, check_cga_args

__all__ = ['BACKENDS', 'check_backend', 'cascaded_group_attention', 'available_backends',
           'cpu_extension_status', 'resolve_backend']

logger = logging.getLogger(__name__)

BACKENDS = ('auto', 'fused', 'reference', 'cpu', 'triton')
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (backend, dtype, C, heads, K) classes whose fused kernel failed under 'auto': they run the
# reference from then on (bounded by the few shape classes a model has).
_FAILED_CLASSES: Set[tuple] = set()


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ``ValueError`` naming them."""
    if backend not in BACKENDS:
        raise ValueError(f'unknown attention backend {backend!r}; choose one of {BACKENDS}')
    return backend


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    logger.warning(message)


@functools.lru_cache(maxsize=None)
def _cpu_extension() -> Tuple[Optional[ModuleType], str]:
    """The C++ extension and ``isa=...``, or ``None`` and why it is missing (imported once)."""
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
    ext, detail = _cpu_extension()
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
        ext, why = _cpu_extension()
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


def _fused_status(device: torch.device, dtype: torch.dtype) -> Tuple[Optional[str], str]:
    """The fused backend for ``device``/``dtype`` and ``''``, or ``None`` and why not."""
    name = {'cuda': 'triton', 'cpu': 'cpu'}.get(device.type)
    if name is None:
        return None, f'no fused kernel for {device.type} tensors'
    error = _backend_error(name, device, dtype)
    return (name, '') if error is None else (None, str(error))


def available_backends(device='cpu') -> List[str]:
    """Concrete backends that can run on ``device`` (besides ``auto`` and ``fused``)."""
    device = torch.device(device)
    out = ['reference']
    if device.type == 'cpu' and _cpu_extension()[0] is not None:
        out.append('cpu')
    if _triton_status(device)[0]:
        out.append('triton')
    return out


def _in_trace_or_onnx_export() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return bool(torch.onnx.is_in_onnx_export())


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend (``reference``, ``cpu`` or ``triton``) that runs ``x``."""
    check_backend(backend)
    if backend in ('reference', 'cpu', 'triton'):
        return backend
    if backend == 'auto' and _in_trace_or_onnx_export():
        return 'reference'
    fused, why = _fused_status(x.device, x.dtype)
    if fused is not None:
        return fused
    if backend == 'fused':
        raise RuntimeError(f'attention backend "fused" cannot run here: {why}')
    if x.device.type == 'cpu' and x.dtype in _CPU_DTYPES:  # the extension should be there
        _warn_once(f'efficientvit_det: fused attention C++ kernel unavailable, using the PyTorch '
                   f'reference instead ({why})')
    return 'reference'


def _require(name: str, x: Tensor) -> None:
    """Raise with the reason if the explicitly requested backend ``name`` cannot run ``x``."""
    error = _backend_error(name, x.device, x.dtype)
    if error is not None:
        raise error


def _kernels(backend: str):
    """The module implementing ``forward``/``backward`` of a fused backend."""
    if backend == 'cpu':
        return _cpu_extension()[0]
    from . import cga_triton
    return cga_triton


# ---------------------------------------------------------------------------------------------
# the registered torch op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op('efficientvit_det::cga', mutates_args=())
def _cga_op(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
            dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
            key_dim: int, window_size: int, scale: float, backend: str,
            fallback: bool) -> Tensor:
    """``backend``: 'cpu' or 'triton'; ``fallback``: the backward may fall back (``auto``)."""
    return _kernels(backend).forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias,
                                     proj_weight, proj_bias, key_dim, window_size, scale)


@_cga_op.register_fake
def _cga_fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op('efficientvit_det::cga_backward', mutates_args=())
def _cga_backward_op(grad_y: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor,
                     dw_weight: Tensor, dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor,
                     proj_bias: Tensor, key_dim: int, window_size: int, scale: float,
                     backend: str) -> List[Tensor]:
    inputs = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    grads = _kernels(backend).backward(grad_y, *inputs, key_dim, window_size, scale)
    # each gradient in its input's dtype (a kernel may accumulate weights in float32)
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, inputs)]


@_cga_backward_op.register_fake
def _cga_backward_fake(grad_y, *args):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in args[:8]]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.meta = tuple(inputs[8:11])
    ctx.backend, ctx.fallback = inputs[11], inputs[12]


def _reference_grads(grad_y: Tensor, inputs: Sequence[Tensor], meta: tuple) -> List[Tensor]:
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        y = cga_reference(*leaves, *meta)
        return list(torch.autograd.grad(y, leaves, grad_y))


def _cga_grad(ctx, grad_y):
    inputs = ctx.saved_tensors
    cls = _shape_class(ctx.backend, *inputs[:2], inputs[3]) + ('backward',)
    if ctx.fallback and cls in _FAILED_CLASSES:
        grads = _reference_grads(grad_y, inputs, ctx.meta)
    else:
        try:
            grads = torch.ops.efficientvit_det.cga_backward(grad_y.contiguous(), *inputs,
                                                            *ctx.meta, ctx.backend)
        except Exception as exc:  # noqa: BLE001 - the optional kernel; explicit backends raise
            if not ctx.fallback:
                raise
            _FAILED_CLASSES.add(cls)
            _warn_once(f'efficientvit_det: the {ctx.backend} attention backward kernel failed '
                       f'for (dtype, C, heads, K)={cls[1:4]}: {type(exc).__name__}: {exc}; its '
                       'gradients come from the PyTorch reference from now on')
            grads = _reference_grads(grad_y, inputs, ctx.meta)
    return (*grads, None, None, None, None, None)


_cga_op.register_autograd(_cga_grad, setup_context=_setup_context)


def _shape_class(backend: str, x: Tensor, qkv_weight: Tensor, dw_weight: Tensor) -> tuple:
    return backend, x.dtype, x.shape[1], qkv_weight.shape[0], dw_weight.shape[-1]


def _fused_or_reference(args: Sequence[Tensor], meta: tuple, backend: str) -> Tensor:
    """``auto``: the fused op, or the reference for a shape class whose kernel failed."""
    cls = _shape_class(backend, args[0], args[1], args[3])
    if cls in _FAILED_CLASSES:
        return cga_reference(*args, *meta)
    try:
        return _cga_op(*args, *meta, backend, True)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel
        _FAILED_CLASSES.add(cls)
        _warn_once(f'efficientvit_det: the {backend} attention kernel failed for '
                   f'(dtype, C, heads, K)={cls[1:]}: {type(exc).__name__}: {exc}; this shape '
                   'class runs the PyTorch reference from now on')
        return cga_reference(*args, *meta)


def cascaded_group_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
                             dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor,
                             proj_bias: Tensor, key_dim: int, window_size: int = 7,
                             scale: Optional[float] = None, backend: str = 'auto') -> Tensor:
    """Windowed cascaded group attention of EfficientViT, fused.

    Args:
        x: ``(B, C, H, W)`` map, any ``H, W >= 1``.
        qkv_weight: ``(heads, 2*key_dim + val_dim, C // heads)`` 1x1 conv, BN folded.
        qkv_bias: ``(heads, 2*key_dim + val_dim)``.
        dw_weight: ``(heads, key_dim, K, K)`` depthwise conv on q, BN folded; a head with a
            smaller kernel has it zero-embedded at the centre of ``K x K`` (K odd).
        dw_bias: ``(heads, key_dim)``.
        attn_bias: ``(heads, window_size**2)`` table indexed by ``|dy| * window_size + |dx|``.
        proj_weight: ``(C, heads * val_dim)`` projection, BN folded. proj_bias: ``(C,)``.
        key_dim: q/k dim per head. window_size: window side. scale: default ``key_dim**-0.5``.
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        ``(B, C, H, W)`` (no residual).
    """
    check_cga_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                   proj_bias, key_dim, window_size)
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))
    scale = float(key_dim ** -0.5 if scale is None else scale)
    meta = (int(key_dim), int(window_size), scale)
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    name = resolve_backend(backend, x)
    if name == 'reference':
        return cga_reference(*args, *meta)
    if backend == 'auto':
        return _fused_or_reference(args, meta, name)
    _require(name, x)
    return _cga_op(*args, *meta, name, False)
