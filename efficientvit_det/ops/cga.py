"""The public fused windowed cascaded group attention (CGA) op and its backend dispatch.

``cascaded_group_attention`` computes the whole windowed CGA block of EfficientViT straight
from an NCHW map, with BatchNorms folded into the weights: implicit zero padding to a multiple
of the window, window partition, per head the 1x1 qkv conv, the depthwise conv on q (zero at
window borders), scaled scores plus the (|dy|, |dx|) bias table, softmax, cascade into the next
head, then ReLU, the 1x1 projection, un-partition and crop (docs/facts.md, "The op"). The
residual add is not part of the op.

Backends (:data:`BACKENDS`; the backbone's ``attn_backend`` has the same names with
``module`` for its module path instead of ``reference``: :mod:`.dispatch`)
---------------------------------------------------------------------------------------
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
``auto``       ``fused`` where it can run for the device and dtype, else ``reference``. A fused
               kernel that fails, or disagrees with the reference when verified on first use,
               continues on the reference for that call and shape class (:mod:`.guard`: the
               failure policy, out-of-memory errors propagate): an optional fast path never
               ends a training run. Tracing / ONNX export -> ``reference`` (plain ops).

:func:`.dispatch.plan_attention` decides, once per call; the fallback lives inside the
registered op's implementations, so it holds under autograd, autocast, ``torch.compile`` and
DDP alike.

``cpu`` and ``triton`` run as one registered torch op, ``torch.ops.efficientvit_det.cga``
(``torch.library.custom_op`` with a fake implementation and an autograd formula that calls
``torch.ops.efficientvit_det.cga_backward``), so ``torch.compile`` and ``torch.export`` see
one node. It saves only its inputs for backward; gradients are not differentiable twice.

Under autocast the input is cast to the autocast dtype, as the reference's first conv would
do; the weights stay in their dtype (float32 folded BatchNorms) and the kernels accumulate in
float32.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from . import dispatch, guard
from .cga_reference import check_cga_args
from .dispatch import (
    BACKENDS,
    AttentionPlan,
    available_backends,
    check_backend,
    cpu_extension_status,
    plan_attention,
    resolve_backend,
)

__all__ = ['BACKENDS', 'check_backend', 'cascaded_group_attention', 'available_backends',
           'cpu_extension_status', 'resolve_backend']


def _kernels(backend: str):
    """The module implementing ``forward``/``backward`` of a fused backend."""
    if backend == 'cpu':
        ext, why = dispatch.cpu_extension()
        if ext is None:
            raise ImportError(f'attention backend "cpu" unavailable: {why}')
        return ext
    from . import cga_triton
    return cga_triton


# ---------------------------------------------------------------------------------------------
# the registered torch ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op('efficientvit_det::cga', mutates_args=())
def _cga_op(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
            dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
            key_dim: int, window_size: int, scale: float, backend: str,
            fallback: bool) -> Tensor:
    """``backend``: 'cpu' or 'triton'; ``fallback``: ``auto`` (:mod:`.guard` decides, else
    the kernel's errors propagate)."""
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    meta = (key_dim, window_size, scale)
    if not fallback:
        return _kernels(backend).forward(*args, *meta)
    return guard.guarded_forward(backend, lambda *a: _kernels(backend).forward(*a), args, meta)


@_cga_op.register_fake
def _cga_fake(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op('efficientvit_det::cga_backward', mutates_args=())
def _cga_backward_op(grad_y: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor,
                     dw_weight: Tensor, dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor,
                     proj_bias: Tensor, key_dim: int, window_size: int, scale: float,
                     backend: str, fallback: bool) -> List[Tensor]:
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    meta = (key_dim, window_size, scale)
    grad_y = grad_y.contiguous()
    if fallback:
        return guard.guarded_backward(backend, lambda *a: _kernels(backend).backward(*a),
                                      grad_y, args, meta)
    grads = _kernels(backend).backward(grad_y, *args, *meta)
    # each gradient in its input's dtype (a kernel may accumulate weights in float32)
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, args)]


@_cga_backward_op.register_fake
def _cga_backward_fake(grad_y, *args):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in args[:8]]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.rest = tuple(inputs[8:13])  # key_dim, window_size, scale, backend, fallback


def _cga_grad(ctx, grad_y):
    grads = torch.ops.efficientvit_det.cga_backward(grad_y, *ctx.saved_tensors, *ctx.rest)
    return (*grads, None, None, None, None, None)


_cga_op.register_autograd(_cga_grad, setup_context=_setup_context)


def cascaded_group_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
                             dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor,
                             proj_bias: Tensor, key_dim: int, window_size: int = 7,
                             scale: Optional[float] = None,
                             backend: Union[str, AttentionPlan] = 'auto') -> Tensor:
    """Windowed cascaded group attention of EfficientViT, fused.

    Args:
        x: ``(B, C, H, W)`` map, any ``B >= 0``, ``H, W >= 1``.
        qkv_weight: ``(heads, 2*key_dim + val_dim, C // heads)`` 1x1 conv, BN folded.
        qkv_bias: ``(heads, 2*key_dim + val_dim)``.
        dw_weight: ``(heads, key_dim, K, K)`` depthwise conv on q, BN folded; a head with a
            smaller kernel has it zero-embedded at the centre of ``K x K`` (K odd).
        dw_bias: ``(heads, key_dim)``.
        attn_bias: ``(heads, window_size**2)`` table indexed by ``|dy| * window_size + |dx|``.
        proj_weight: ``(C, heads * val_dim)`` projection, BN folded. proj_bias: ``(C,)``.
        key_dim: q/k dim per head. window_size: window side. scale: default ``key_dim**-0.5``.
        backend: one of :data:`BACKENDS` (see the module docstring), or the
            :class:`~.dispatch.AttentionPlan` a caller already made for this call.

    Returns:
        ``(B, C, H, W)`` (no residual).
    """
    check_cga_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight,
                   proj_bias, key_dim, window_size)
    plan = backend if isinstance(backend, AttentionPlan) else plan_attention(backend, x)
    if plan.kernel == 'module':
        raise ValueError("the 'module' path belongs to the backbone's LocalWindowAttention")
    if x.is_floating_point() and x.dtype != plan.dtype:  # autocast: as the reference's conv
        x = x.to(plan.dtype)
    scale = float(key_dim ** -0.5 if scale is None else scale)
    meta = (int(key_dim), int(window_size), scale)
    args = (x, qkv_weight, qkv_bias, dw_weight, dw_bias, attn_bias, proj_weight, proj_bias)
    if plan.kernel == 'reference':
        return guard.reference_forward(args, meta)
    return _cga_op(*args, *meta, plan.kernel, plan.fallback)
