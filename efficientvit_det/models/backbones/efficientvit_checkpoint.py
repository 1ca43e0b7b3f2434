"""Loading the classification checkpoints users hold into the detection backbone.

Two layouts exist (REFERENCE.md section 4):

* MSRA original: ``patch_embed.{0,2,4,6}``, ``blocks{1,2,3}.*``, Conv2d_BN children ``c``/``bn``;
  ``blocks2``/``blocks3`` start with [res dw+FFN, PatchMerging, res dw+FFN] then the blocks.
* timm: ``patch_embed.conv1..4``, ``stages.{i}.downsample.{res1,patchmerge,res2}``,
  ``stages.{i}.blocks.{j}``, ConvNorm children ``conv``/``bn`` (our own names).

Both may be wrapped (``model``/``state_dict``/``module.``/``backbone.``) and both carry
classifier keys and, at 224 px, a stage-3 bias table of (heads, 16): it is resized
bicubically to the backbone's 7x7 table.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger, print_log
from torch import Tensor, nn

LAYOUTS = ('msra', 'timm')
_CLASSIFIER_PREFIXES = ('head.', 'head_dist.', 'dist_head.', 'fc.', 'classifier.')


class CheckpointLayoutError(ValueError):
    """The checkpoint is not an EfficientViT backbone in a layout we know."""


class UnsafeCheckpointError(RuntimeError):
    """The checkpoint's pickle asks for objects outside the weights-only allow-list."""


def load_checkpoint_file(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (local path or any mmengine URI)."""
    if not os.path.isfile(path) and '://' not in path:
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        if os.path.isfile(path):
            return torch.load(path, map_location='cpu', weights_only=True)
        from mmengine.runner.checkpoint import CheckpointLoader  # torch.load: weights_only default
        return CheckpointLoader.load_checkpoint(path, map_location='cpu')
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines()
                       if 'Unsupported' in line or 'refused' in line), str(e).splitlines()[0])
        raise UnsafeCheckpointError(
            f'refused to load {path}: its pickle asks for objects outside the weights-only '
            f'allow-list, which could run code on this machine ({reason.strip()}). Re-save the '
            'weights as a plain state dict from a trusted environment.') from None


def unwrap_state_dict(checkpoint: dict) -> Dict[str, Tensor]:
    """The state dict inside a checkpoint, without DDP / detector prefixes."""
    sd = checkpoint
    for key in ('model', 'state_dict', 'model_ema'):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointLayoutError('checkpoint holds no state dict of tensors '
                                    f'(top-level keys: {list(checkpoint)[:10]})')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if any(k.startswith('backbone.') for k in sd):  # a detector checkpoint
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    return sd


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    if 'patch_embed.0.c.weight' in state_dict:
        return 'msra'
    if 'patch_embed.conv1.conv.weight' in state_dict or 'patch_embed.conv1.weight' in state_dict:
        return 'timm'
    raise CheckpointLayoutError(
        'unknown checkpoint layout: expected an EfficientViT classification checkpoint in the '
        "MSRA layout ('patch_embed.0.c.weight', 'blocks1.*') or the timm layout "
        f"('patch_embed.conv1.conv.weight', 'stages.*'); first keys: {list(state_dict)[:8]}")


def _msra_key(key: str) -> Optional[str]:
    """Map one MSRA key to our (timm) name; None for keys with no counterpart."""
    key = re.sub(r'\.c\.(weight|bias)$', r'.conv.\1', key)
    key = re.sub(r'\.l\.(weight|bias)$', r'.linear.\1', key)
    m = re.match(r'patch_embed\.(\d+)\.(.*)', key)
    if m:
        return f'patch_embed.conv{int(m.group(1)) // 2 + 1}.{m.group(2)}'
    m = re.match(r'blocks(\d)\.(\d+)\.(.*)', key)
    if not m:
        return None
    stage, idx, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    if stage == 0:
        return f'stages.0.blocks.{idx}.{rest}'
    if idx < 3:  # the downsample prefix of stages 2 and 3
        return f'stages.{stage}.downsample.{("res1", "patchmerge", "res2")[idx]}.{rest}'
    return f'stages.{stage}.blocks.{idx - 3}.{rest}'


def resize_attention_bias(bias: Tensor, window_size: int) -> Tensor:
    """(heads, S*S) table -> (heads, ws*ws) by bicubic interpolation on the SxS grid."""
    heads, n = bias.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise CheckpointLayoutError(f'attention bias table of length {n} is not square')
    grid = bias.float().reshape(1, heads, side, side)
    grid = F.interpolate(grid, size=(window_size, window_size), mode='bicubic', align_corners=False)
    return grid.reshape(heads, window_size * window_size).to(bias.dtype)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Convert an MSRA or timm state dict to ``model``'s key layout.

    Drops classifier keys and the bias index buffers, renames MSRA keys and resizes
    bias tables whose length differs from the model's window.
    """
    layout = detect_layout(state_dict)
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith('attention_bias_idxs') or key.startswith(_CLASSIFIER_PREFIXES):
            continue
        new_key = _msra_key(key) if layout == 'msra' else key
        if new_key is None:
            new_key = key  # reported as unexpected by the loader
        if new_key.endswith('attention_biases') and new_key in target \
                and value.shape != target[new_key].shape and value.shape[0] == target[new_key].shape[0]:
            value = resize_attention_bias(value, int(round(target[new_key].shape[1] ** 0.5)))
        out[new_key] = value
    return out


def infer_arch(state_dict: Dict[str, Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Embed dims and depths of a state dict in our layout (for error messages)."""
    dims, depths = [], []
    for i in range(3):
        blocks = {int(m.group(1)) for k in state_dict
                  for m in [re.match(rf'stages\.{i}\.blocks\.(\d+)\.', k)] if m}
        depths.append(len(blocks))
        w = state_dict.get(f'stages.{i}.blocks.0.dw0.m.conv.weight')
        dims.append(int(w.shape[0]) if w is not None else -1)
    return tuple(dims), tuple(depths)


def load_pretrained(model: nn.Module, path: str, prefix: Optional[str] = None,
                    logger: Optional[MMLogger] = None) -> Tuple[list, list]:
    """Load an MSRA/timm/converted checkpoint into an :class:`EfficientViT` backbone.

    Args:
        model: the backbone.
        path: checkpoint path or URI.
        prefix: optional key prefix to select (e.g. 'backbone.'), stripped before loading.

    Returns:
        (missing_keys, unexpected_keys); both are also logged by name.
    """
    checkpoint = load_checkpoint_file(path)
    sd = unwrap_state_dict(checkpoint)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        sd = checkpoint_filter_fn(sd, model)
    except CheckpointLayoutError as e:
        raise CheckpointLayoutError(f'{path}: {e}') from None
    target = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}'
                  for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        dims, depths = infer_arch(sd)
        raise CheckpointLayoutError(
            f'{path} does not fit this backbone (arch {getattr(model, "arch_name", "?")}, '
            f'embed_dims {tuple(model.arch["embed_dims"])}, depths {tuple(model.arch["depths"])}): '
            f'the checkpoint has embed_dims {dims}, depths {depths}. Set backbone.arch to the '
            f'checkpoint\'s arch. First mismatches: {mismatched[:5]}')
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys]
    unexpected = list(result.unexpected_keys)
    log = logger or MMLogger.get_current_instance()
    print_log(f'loaded EfficientViT weights from {path} ({len(sd)} tensors)', logger=log)
    if missing:
        print_log(f'missing keys in the backbone (left at their initial values): {missing}',
                  logger=log, level=30)
    if unexpected:
        print_log(f'unexpected keys in the checkpoint (ignored): {unexpected}', logger=log, level=30)
    return missing, unexpected
