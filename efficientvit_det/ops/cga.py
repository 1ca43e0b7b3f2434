"""Public fused windowed cascaded group attention (CGA) op and its backend dispatch.

``cascaded_group_attention`` computes the whole windowed CGA block of EfficientViT
(REFERENCE.md sections 2-3) straight from an NCHW map, with BatchNorms folded into the weights:
implicit zero padding to a multiple of the window, window partition, per head the 1x1 qkv conv,
the depthwise conv on q (zero at window borders), scaled scores plus the (|dy|, |dx|) bias table,
softmax, cascade into the next head, then ReLU, the 1x1 projection, un-partition and crop. The
residual add is not part of the op.

Backends
--------
``reference``  plain PyTorch (:mod:`.cga_reference`), the oracle; autograd by PyTorch.
``cpu``        C++ extension ``efficientvit_det.ops._cga_cpu`` built at install time; float32 and
               float64, CPU tensors. One task per (image, window) over ``at::parallel_for``; the
               backward recomputes each window's forward in thread-local buffers, so nothing per
               window is stored between forward and backward.
``triton``     Triton kernels (:mod:`.cga_triton`) for CUDA tensors (float32, float16, bfloat16);
               on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
``auto``       CUDA tensor -> ``triton`` if Triton imports, else ``reference``; CPU float32/float64
               -> ``cpu`` if the extension is built, else ``reference`` (warns once, with the
               reason); other CPU dtypes -> ``reference``. Tracing / scripting / ONNX export ->
               ``reference``.

The ``cpu`` and ``triton`` backends run inside one ``torch.autograd.Function`` that saves only
its inputs; gradients w.r.t. ``x`` and every weight tensor are exact (not differentiable twice).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cga_reference import cga_reference, check_cga_args

__all__ = ['cascaded_group_attention', 'available_backends', 'cpu_extension_status',
           'resolve_backend', 'BACKENDS']

logger = logging.getLogger(__name__)

BACKENDS = ('auto', 'reference', 'cpu', 'triton')

_cpu_ext = None
_cpu_ext_error: Optional[str] = None
_cpu_ext_tried = False
_warned_fallback = False


def _load_cpu_ext():
    """Import the C++ extension once; remember why it failed."""
    global _cpu_ext, _cpu_ext_error, _cpu_ext_tried
    if not _cpu_ext_tried:
        _cpu_ext_tried = True
        if os.environ.get('EVIT_CGA_DISABLE_CPU_EXT', '0') == '1':
            _cpu_ext_error = 'disabled by EVIT_CGA_DISABLE_CPU_EXT=1'
        else:
            try:
                from . import _cga_cpu  # type: ignore[attr-defined]
                _cpu_ext = _cga_cpu
            except Exception as exc:  # ImportError, or OSError for an ABI mismatch
                _cpu_ext_error = (f'{type(exc).__name__}: {exc} (the extension is built by '
                                  f'`pip install --no-build-isolation -e .`; a failed build only '
                                  f'prints a warning)')
    return _cpu_ext


def cpu_extension_status() -> Tuple[bool, str]:
    """``(available, detail)``: detail is the ISA in use, or why the extension is missing."""
    ext = _load_cpu_ext()
    if ext is None:
        return False, str(_cpu_ext_error)
    return True, f'isa={ext.isa()}'


def _triton_usable(device: torch.device) -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with CUDA torch
        return False, f'triton does not import: {exc}'
    if device.type == 'cuda':
        return True, ''
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        return True, 'interpreter'
    return False, 'triton needs a CUDA tensor (or TRITON_INTERPRET=1 for tests)'


def available_backends(device='cpu') -> List[str]:
    """Backends that can run on ``device`` (besides ``auto``)."""
    device = torch.device(device)
    out = ['reference']
    if device.type == 'cpu' and _load_cpu_ext() is not None:
        out.append('cpu')
    if _triton_usable(device)[0]:
        out.append('triton')
    return out


def _in_export_or_trace() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    onnx = getattr(torch, 'onnx', None)
    try:
        return bool(onnx is not None and onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover
        return False


def resolve_backend(backend: str, x: Tensor) -> str:
    """Map ``backend`` (maybe ``auto``) to the concrete backend used for ``x``."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; choose from {BACKENDS}')
    if backend != 'auto':
        return backend
    if _in_export_or_trace():
        return 'reference'
    if x.device.type == 'cuda':
        return 'triton' if _triton_usable(x.device)[0] else 'reference'
    if x.device.type == 'cpu' and x.dtype in (torch.float32, torch.float64):
        if _load_cpu_ext() is not None:
            return 'cpu'
        if not _warned_fallback:
            _warned_fallback = True
            msg = (f'efficientvit_det: fused CGA C++ backend unavailable, using the PyTorch '
                   f'reference instead ({_cpu_ext_error})')
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            logger.warning(msg)
    return 'reference'


class _FusedCGA(torch.autograd.Function):
    """Forward/backward through a fused backend; saves only the inputs."""

    @staticmethod
    def forward(ctx, impl, key_dim, window_size, scale, x, qkv_weight, qkv_bias, dw_weight,
                dw_bias, attn_bias, proj_weight, proj_bias):
        y = impl.forward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                         proj_bias, key_dim, window_size, scale)
        ctx.impl = impl
        ctx.meta = (key_dim, window_size, scale)
        ctx.save_for_backward(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias,
                              proj_weight, proj_bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        key_dim, window_size, scale = ctx.meta
        saved = ctx.saved_tensors
        grads = ctx.impl.backward(grad_y.contiguous(), *saved, key_dim, window_size, scale)
        grads = [g.to(t.dtype) if g.dtype != t.dtype else g for g, t in zip(grads, saved)]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[4:])]
        return (None, None, None, None, *grads)


class _CpuImpl:
    """Adapter of the C++ extension to the _FusedCGA interface."""

    @staticmethod
    def forward(x, *args):
        return _load_cpu_ext().forward(x, *args)

    @staticmethod
    def backward(gy, *args):
        return _load_cpu_ext().backward(gy, *args)


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
        backend: ``'auto' | 'reference' | 'cpu' | 'triton'`` (see the module docstring).

    Returns:
        ``(B, C, H, W)`` (no residual).
    """
    check_cga_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                   proj_bias, key_dim, window_size)
    if scale is None:
        scale = key_dim ** -0.5
    scale = float(scale)
    key_dim, window_size = int(key_dim), int(window_size)
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    name = resolve_backend(backend, x)
    if name == 'reference':
        return cga_reference(*args, key_dim, window_size, scale)
    if name == 'cpu':
        if _load_cpu_ext() is None:
            raise RuntimeError(f'cga backend "cpu" unavailable: {_cpu_ext_error}')
        if any(t.device.type != 'cpu' for t in args):
            raise ValueError('cga backend "cpu" needs CPU tensors')
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f'cga backend "cpu" supports float32/float64, got {x.dtype}')
        impl = _CpuImpl
    else:  # triton
        ok, why = _triton_usable(x.device)
        if not ok:
            raise RuntimeError(f'cga backend "triton" unavailable: {why}')
        from . import cga_triton
        impl = cga_triton
    return _FusedCGA.apply(impl, key_dim, window_size, scale, *args)
