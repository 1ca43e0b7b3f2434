"""The fused attention op in mmengine's complexity analysis (``FlopAnalyzer``,
``ActivationAnalyzer``, ``get_model_complexity_info`` and so mmdet's ``get_flops.py``).

mmengine counts a model by tracing it and giving every traced op to a handle; an op without
one (``efficientvit_det::cga``, the ``cpu`` / ``triton`` / ``fused`` attention backends) is
counted as 0 with an "Unsupported operator" warning. The handles here count the op as the
``reference`` backend's module path is counted with mmengine's default handles (the
original's modules: per head a 1x1 qkv Conv+BN, a depthwise Conv+BN on q with that head's
kernel, ``q^T k`` and ``v attn^T``; then the 1x1 projection Conv+BN, all on the zero-padded
windows), so the count does not depend on the attention backend:

* ``conv``: qkv, depthwise and projection convs (multiply-adds);
* ``matmul``: the two attention products;
* ``batch_norm``: 2 per element of each BatchNorm's input in eval mode, mmengine's
  ``batchnorm_flop_jit`` (the fused op needs eval-mode BatchNorms folded into its weights).

:func:`cga_macs_jit` leaves the BatchNorms out, for analyses that count multiply-adds only
(``python -m benchmarks flops``). The per-head kernel sizes are not in the op's inputs (a
smaller kernel is zero-embedded in the largest): they are read from the traced graph that
builds ``dw_weight`` (the kernel each head's centring pad receives), else from the zero
border of a constant ``dw_weight``, else every head counts the largest kernel.

Importing this module registers the handles with mmengine's default tables, so every
analyzer made afterwards has them; ``efficientvit_det`` imports it with its models.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, List, Optional, Sequence

import torch

__all__ = ['CGA_OP', 'cga_counts', 'cga_flop_jit', 'cga_macs_jit', 'cga_activation_jit',
           'kernels_from_weight', 'register_complexity_handles']

CGA_OP = 'efficientvit_det::cga'

# positions in the op's schema (efficientvit_det/ops/cga.py)
_X, _QKV_W, _DW_W, _PROJ_W, _KEY_DIM, _WINDOW = 0, 1, 3, 6, 8, 9


def cga_counts(x_shape: Sequence[int], qkv_shape: Sequence[int], proj_shape: Sequence[int],
               key_dim: int, window_size: int, kernels: Sequence[int]) -> dict:
    """What the reference path of one windowed attention counts, by mmengine operator name.

    Args:
        x_shape: ``(B, C, H, W)``; qkv_shape: ``(heads, 2*key_dim + val_dim, C // heads)``;
        proj_shape: ``(C, heads * val_dim)``; kernels: the q depthwise kernel of each head.

    Returns ``conv`` and ``matmul`` (multiply-adds), ``batch_norm`` (mmengine's eval-mode
    BatchNorm count), ``conv_activations`` and ``matmul_activations`` (output elements, what
    mmengine's ``ActivationAnalyzer`` counts).
    """
    b, c, h, w = x_shape
    heads, d, cin = qkv_shape
    val_dim = d - 2 * key_dim
    n = window_size * window_size
    tokens = b * math.ceil(h / window_size) * math.ceil(w / window_size) * n  # padded
    conv = heads * tokens * cin * d                              # qkv 1x1 per head
    conv += sum(tokens * key_dim * k * k for k in kernels)       # depthwise on q
    conv += tokens * proj_shape[1] * proj_shape[0]               # projection 1x1
    matmul = heads * tokens * n * (key_dim + val_dim)            # q^T k, v attn^T
    norm = 2 * tokens * (heads * (d + key_dim) + c)              # qkv, dw, proj BNs
    return dict(conv=conv, matmul=matmul, batch_norm=norm,
                conv_activations=tokens * (heads * (d + key_dim) + c),
                matmul_activations=tokens * heads * (n + val_dim))


def _shape(value: Any) -> Optional[List[int]]:
    return value.type().sizes() if value.isCompleteTensor() else None


def _constant(value: Any) -> Any:
    node = value.node()
    return node.output().toIValue() if node.kind() == 'prim::Constant' else None


def _kernels_from_graph(dw_weight: Any, heads: int) -> Optional[List[int]]:
    """Each head's kernel from the trace, ``dw_weight = stack([pad(w_h, ...), ...])``: the
    size of the kernel each pad receives."""
    node = dw_weight.node()
    if node.kind() != 'aten::stack':
        return None
    parts = list(next(iter(node.inputs())).node().inputs())
    if len(parts) != heads:
        return None
    kernels = []
    for part in parts:
        pad = part.node()
        if pad.kind() not in ('aten::constant_pad_nd', 'aten::pad'):
            return None
        shape = _shape(next(iter(pad.inputs())))
        if not shape or len(shape) < 2 or shape[-1] != shape[-2]:
            return None
        kernels.append(int(shape[-1]))
    return kernels


def kernels_from_weight(weight: torch.Tensor) -> List[int]:
    """Each head's kernel from a ``(heads, key_dim, K, K)`` weight's zero border."""
    kmax = weight.shape[-1]
    kernels = []
    for head in weight.detach():
        k = kmax
        while k > 1:
            p = (kmax - k) // 2 + 1  # would the ring just inside the current kernel be zero?
            inner = torch.zeros_like(head, dtype=torch.bool)
            inner[:, p:kmax - p, p:kmax - p] = True
            if head[~inner].any():
                break
            k -= 2
        kernels.append(k)
    return kernels


def _op_counts(inputs: List[Any]) -> dict:
    x_shape, qkv_shape = _shape(inputs[_X]), _shape(inputs[_QKV_W])
    dw_shape, proj_shape = _shape(inputs[_DW_W]), _shape(inputs[_PROJ_W])
    key_dim, window = _constant(inputs[_KEY_DIM]), _constant(inputs[_WINDOW])
    heads, kmax = qkv_shape[0], dw_shape[-1]
    kernels = _kernels_from_graph(inputs[_DW_W], heads)
    if kernels is None:
        weight = _constant(inputs[_DW_W])
        kernels = kernels_from_weight(weight) if isinstance(weight, torch.Tensor) \
            else [kmax] * heads
    return cga_counts(x_shape, qkv_shape, proj_shape, int(key_dim), int(window), kernels)


def cga_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """FLOP handle of ``efficientvit_det::cga``: the reference path's count under mmengine's
    default handles (convs, matmuls and eval-mode BatchNorms)."""
    c = _op_counts(inputs)
    return Counter(conv=c['conv'], matmul=c['matmul'], batch_norm=c['batch_norm'])


def cga_macs_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """FLOP handle counting multiply-adds only (BatchNorms folded away)."""
    c = _op_counts(inputs)
    return Counter(conv=c['conv'], matmul=c['matmul'])


def cga_activation_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Activation handle: the output elements of the reference path's convs and matmuls."""
    c = _op_counts(inputs)
    return Counter(conv=c['conv_activations'], matmul=c['matmul_activations'])


def register_complexity_handles() -> None:
    """Add the handles to mmengine's default handle tables (idempotent)."""
    from mmengine.analysis import complexity_analysis
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[CGA_OP] = cga_flop_jit
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS[CGA_OP] = cga_activation_jit


register_complexity_handles()
