"""Test-only utilities: inputs of the fused attention op, timm <-> MSRA key renaming, timm stage
outputs, a relative closeness assert (randomised weights and oracles shared with the benchmarks:
efficientvit_det.testing)."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn


def cga_inputs(B: int, C: int, H: int, W: int, heads: int, kernels: Sequence[int],
               key_dim: int = 16, ws: int = 7, dtype: torch.dtype = torch.float64,
               seed: int = 0, val_dim: Optional[int] = None, device='cpu') -> List[Tensor]:
    """Random BN-folded weights in the fused op's layout, ``[x, qkv_weight, qkv_bias,
    dw_weight, dw_bias, attn_bias, proj_weight, proj_bias]`` (drawn in float64, returned in
    ``dtype`` on ``device``; smaller kernels zero-embedded at the centre of ``K x K``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cin = C // heads
    vd = cin if val_dim is None else val_dim
    K = max(kernels)
    x = r(B, C, H, W)
    qkv_w = r(heads, 2 * key_dim + vd, cin) * cin ** -0.5
    qkv_b = r(heads, 2 * key_dim + vd) * 0.5
    dw_w = torch.zeros(heads, key_dim, K, K, dtype=torch.float64)
    for h, k in enumerate(kernels):
        o = (K - k) // 2
        dw_w[h, :, o:o + k, o:o + k] = r(key_dim, k, k) / k
    dw_b = r(heads, key_dim) * 0.1
    ab = r(heads, ws * ws)
    pw = r(C, heads * vd) * (heads * vd) ** -0.5
    pb = r(C) * 0.1
    return [t.to(device, dtype) for t in (x, qkv_w, qkv_b, dw_w, dw_b, ab, pw, pb)]


def timm_to_msra(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a timm efficientvit_msra state dict into the MSRA original's layout."""
    out = {}
    for key, value in state_dict.items():
        k = re.sub(r'\.conv\.(weight|bias)$', r'.c.\1', key)
        k = re.sub(r'\.linear\.(weight|bias)$', r'.l.\1', k)
        m = re.match(r'patch_embed\.conv(\d)\.(.*)', k)
        if m:
            k = f'patch_embed.{(int(m.group(1)) - 1) * 2}.{m.group(2)}'
        m = re.match(r'stages\.(\d)\.downsample\.(res1|patchmerge|res2)\.(.*)', k)
        if m:
            idx = ('res1', 'patchmerge', 'res2').index(m.group(2))
            k = f'blocks{int(m.group(1)) + 1}.{idx}.{m.group(3)}'
        m = re.match(r'stages\.(\d)\.blocks\.(\d+)\.(.*)', k)
        if m:
            stage, j = int(m.group(1)), int(m.group(2))
            k = f'blocks{stage + 1}.{j + (3 if stage else 0)}.{m.group(3)}'
        out[k] = value
    return out


def timm_stage_outputs(model: nn.Module, x: Tensor):
    """The three stage outputs of a timm EfficientVitMsra."""
    x = model.patch_embed(x)
    outs = []
    for stage in model.stages:
        x = stage(x)
        outs.append(x)
    return outs


def assert_close_rel(actual: Tensor, expected: Tensor, rel: float, what: str = '') -> None:
    """max |a - e| <= rel * max |e| (tolerance relative to the output scale)."""
    assert actual.shape == expected.shape, f'{what}: shape {actual.shape} != {expected.shape}'
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-12), f'{what}: max abs err {err:.3g} > {rel} x scale {scale:.3g}'
