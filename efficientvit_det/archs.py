"""EfficientViT arch presets as data (docs/facts.md, "Model family").

Plain Python, no torch or mmdet: the backbone, the offline Triton compile check and the
benchmarks read the same table. ``kernels`` lists one q-dwconv kernel per head slot; a stage
with h heads uses the first h.
"""
from __future__ import annotations

from typing import Dict, Union

__all__ = ['ARCH_SETTINGS', 'ARCH_FIELDS', 'LEVELS', 'LEVEL_STRIDES', 'resolve_arch']

ARCH_SETTINGS: Dict[str, dict] = {
    'm0': dict(embed_dims=(64, 128, 192), depths=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    'm1': dict(embed_dims=(128, 144, 192), depths=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    'm2': dict(embed_dims=(128, 192, 224), depths=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    'm3': dict(embed_dims=(128, 240, 320), depths=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    'm4': dict(embed_dims=(128, 256, 384), depths=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    'm5': dict(embed_dims=(192, 288, 384), depths=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}
ARCH_FIELDS = ('embed_dims', 'depths', 'num_heads', 'kernels')

# Feature levels that the backbone's ``out_indices`` selects from, and their strides.
LEVELS = ('stem_s4', 'stem_s8', 'stage1', 'stage2', 'stage3')
LEVEL_STRIDES = (4, 8, 16, 32, 64)


def resolve_arch(arch: Union[str, dict]) -> dict:
    """A copy of the preset ``arch`` ('m0'..'m5'), or a checked custom arch dict."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'unknown EfficientViT arch {arch!r}; choose one of '
                             f'{sorted(ARCH_SETTINGS)} or pass a dict with fields {ARCH_FIELDS}')
        return dict(ARCH_SETTINGS[arch])
    if not isinstance(arch, dict) or set(arch) - {*ARCH_FIELDS, 'key_dim', 'window_size'} \
            or not set(ARCH_FIELDS) <= set(arch):
        raise ValueError(f'arch dict must have the fields {ARCH_FIELDS} (optionally key_dim, '
                         f'window_size), got {arch!r}')
    if not len(arch['embed_dims']) == len(arch['depths']) == len(arch['num_heads']) == 3:
        raise ValueError(f'arch dict: embed_dims, depths and num_heads need 3 entries each, got {arch!r}')
    return dict(arch)
