"""The op's weight layout: one packer, used by the backbone and by the timm oracle."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['pack_cga_weights']

ConvWB = Tuple[Tensor, Tensor]


def pack_cga_weights(qkv: Sequence[ConvWB], dws: Sequence[ConvWB], attn_bias: Tensor,
                     proj: ConvWB) -> Dict[str, Tensor]:
    """The keyword weights of :func:`efficientvit_det.ops.cascaded_group_attention` from
    BN-folded convs (differentiable: gradients reach whatever the weights were computed from).

    Args:
        qkv: per head, the 1x1 qkv conv ``(weight (D, C // heads, 1, 1), bias (D,))``.
        dws: per head, the depthwise conv on q ``(weight (key_dim, 1, k, k), bias (key_dim,))``;
            heads may have different odd ``k``: smaller kernels are zero-embedded at the centre
            of the largest (the same result).
        attn_bias: ``(heads, window_size**2)`` bias table.
        proj: the 1x1 projection ``(weight (C, heads * val_dim, 1, 1), bias (C,))``.
    """
    kmax = max(w.shape[-1] for w, _ in dws)
    dw_w = []
    for w, _ in dws:
        p = (kmax - w.shape[-1]) // 2
        dw_w.append(F.pad(w[:, 0], (p, p, p, p)))
    return dict(qkv_weight=torch.stack([w[:, :, 0, 0] for w, _ in qkv]),
                qkv_bias=torch.stack([b for _, b in qkv]),
                dw_weight=torch.stack(dw_w), dw_bias=torch.stack([b for _, b in dws]),
                attn_bias=attn_bias, proj_weight=proj[0][:, :, 0, 0], proj_bias=proj[1])
