"""Window geometry of EfficientViT's attention, shared by the backbone and the op reference.

The original detection code zero-pads every map bottom/right to a multiple of the window
(also maps smaller than one window), attends each window independently and crops the result;
padded tokens are not masked (docs/facts.md, "Windows").
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['window_grid', 'window_partition', 'window_reverse', 'relative_position_index']


def window_grid(x: Tensor, window_size: int) -> Tuple[Tensor, Tuple[int, int]]:
    """Zero-pad NCHW bottom/right to multiples of the window; return it viewed as
    ``(B, C, nh, ws, nw, ws)`` and the grid ``(nh, nw)``."""
    b, c, h, w = x.shape
    ws = window_size
    pad_b, pad_r = (-h) % ws, (-w) % ws
    # unconditional pad and crop: a traced graph (ONNX export) must not bake in "no padding"
    x = F.pad(x, (0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    return x.view(b, c, nh, ws, nw, ws), (nh, nw)


def window_partition(x: Tensor, window_size: int) -> Tuple[Tensor, Tuple[int, int]]:
    """Zero-pad NCHW bottom/right to multiples of the window; return the windows as
    ``(B * nh * nw, C, ws, ws)`` (image-major, row-major) and the grid ``(nh, nw)``."""
    grid, (nh, nw) = window_grid(x, window_size)
    b, c = x.shape[:2]
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, window_size, window_size), \
        (nh, nw)


def window_reverse(windows: Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`, cropped to ``size`` = (H, W)."""
    nh, nw = grid
    n, c, ws, _ = windows.shape
    b = n // (nh * nw)
    x = windows.view(b, nh, nw, c, ws, ws).permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(b, c, nh * ws, nw * ws)
    return x[:, :, :size[0], :size[1]].contiguous()


def relative_position_index(window_size: int,
                            device: Union[torch.device, str, None] = None) -> Tensor:
    """``(N, N)`` long tensor, ``N = ws**2``: ``|dy| * ws + |dx|`` of every (query, key) pair
    of a window, the index into a head's bias table."""
    r = torch.arange(window_size, device=device)
    yy, xx = torch.meshgrid(r, r, indexing='ij')
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    return ((yy[:, None] - yy[None, :]).abs() * window_size
            + (xx[:, None] - xx[None, :]).abs())
