"""Plain PyTorch reference of the windowed cascaded group attention (CGA).

This is the oracle every other backend is tested against. It follows the original
EfficientViT detection code (docs/facts.md) with BatchNorms already folded into the
weights:

1. zero-pad the map bottom/right to a multiple of ``window_size`` (always, also for maps
   smaller than a window), partition into ``ws x ws`` windows (independent items);
2. split the ``C`` channels into ``heads`` chunks; head 0 reads chunk 0, head ``i`` reads
   chunk ``i`` plus the output of head ``i - 1`` (the cascade);
3. per head: 1x1 conv to ``[q (key_dim), k (key_dim), v (val_dim)]``; depthwise ``KxK`` conv on
   ``q`` with zero padding at the window border; ``scores = q^T k * scale + bias`` where the bias
   of the (query, key) pair is ``attn_bias[h, |dy| * ws + |dx|]``; softmax over the keys;
   ``out = v @ attn^T``;
4. concatenate the heads, ReLU, 1x1 projection, un-partition, crop to ``H x W``.

Padded tokens are not masked: after the 1x1 conv they equal the conv bias and take part as
keys and values, exactly like the original. Autograd is PyTorch's own.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .windows import relative_position_index, window_partition, window_reverse

__all__ = ['cga_reference', 'check_cga_args']


def check_cga_args(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
                   dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                   key_dim: int, window_size: int) -> Tuple[int, int, int, int]:
    """Validate shapes; returns ``(heads, cin, val_dim, K)``."""
    if x.dim() != 4:
        raise ValueError(f'x must be (B, C, H, W), got {tuple(x.shape)}')
    B, C, H, W = x.shape
    if qkv_weight.dim() != 3:
        raise ValueError('qkv_weight must be (heads, 2*key_dim + val_dim, C // heads)')
    heads, D, cin = qkv_weight.shape
    if heads < 1 or C != heads * cin:
        raise ValueError(f'C={C} is not heads ({heads}) x C//heads ({cin})')
    val_dim = D - 2 * key_dim
    if key_dim < 1 or val_dim < 1:
        raise ValueError(f'qkv_weight out dim {D} too small for key_dim {key_dim}')
    if heads > 1 and val_dim != cin:
        raise ValueError(f'the cascade needs val_dim ({val_dim}) == C // heads ({cin})')
    if tuple(qkv_bias.shape) != (heads, D):
        raise ValueError(f'qkv_bias must be {(heads, D)}, got {tuple(qkv_bias.shape)}')
    if dw_weight.dim() != 4 or dw_weight.shape[:2] != (heads, key_dim) \
            or dw_weight.shape[2] != dw_weight.shape[3] or dw_weight.shape[2] % 2 != 1:
        raise ValueError(f'dw_weight must be (heads, key_dim, K, K) with K odd, '
                         f'got {tuple(dw_weight.shape)}')
    if tuple(dw_bias.shape) != (heads, key_dim):
        raise ValueError(f'dw_bias must be {(heads, key_dim)}, got {tuple(dw_bias.shape)}')
    if window_size < 1 or tuple(attn_bias.shape) != (heads, window_size * window_size):
        raise ValueError(f'attn_bias must be {(heads, window_size ** 2)}, '
                         f'got {tuple(attn_bias.shape)}')
    if tuple(proj_weight.shape) != (C, heads * val_dim):
        raise ValueError(f'proj_weight must be {(C, heads * val_dim)}, '
                         f'got {tuple(proj_weight.shape)}')
    if tuple(proj_bias.shape) != (C,):
        raise ValueError(f'proj_bias must be {(C,)}, got {tuple(proj_bias.shape)}')
    return heads, cin, val_dim, dw_weight.shape[-1]


def cga_reference(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, dw_weight: Tensor,
                  dw_bias: Tensor, attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                  key_dim: int, window_size: int = 7, scale: Optional[float] = None) -> Tensor:
    """Windowed CGA in plain PyTorch ops (see the module docstring)."""
    heads, cin, val_dim, K = check_cga_args(x, qkv_weight, qkv_bias, dw_weight, dw_bias,
                                            attn_bias, proj_weight, proj_bias, key_dim,
                                            window_size)
    if scale is None:
        scale = key_dim ** -0.5
    xw, grid = window_partition(x, window_size)
    chunks = xw.chunk(heads, dim=1)
    bias = attn_bias[:, relative_position_index(window_size, x.device)]  # (heads, N, N)
    outs = []
    feat = chunks[0]
    for i in range(heads):
        if i > 0:
            feat = feat + chunks[i]
        qkv = F.conv2d(feat, qkv_weight[i][:, :, None, None], qkv_bias[i])
        q, k, v = qkv.split([key_dim, key_dim, val_dim], dim=1)
        q = F.conv2d(q, dw_weight[i][:, None], dw_bias[i], padding=K // 2, groups=key_dim)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
        attn = (q.transpose(-2, -1) @ k) * scale + bias[i]
        attn = attn.softmax(dim=-1)
        feat = (v @ attn.transpose(-2, -1)).view(-1, val_dim, window_size, window_size)
        outs.append(feat)
    y = torch.relu(torch.cat(outs, dim=1))
    y = F.conv2d(y, proj_weight[:, :, None, None], proj_bias)
    return window_reverse(y, grid, x.shape[2:])
