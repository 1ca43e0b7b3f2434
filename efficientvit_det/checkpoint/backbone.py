"""Backbone key layouts: classification checkpoints users hold into the detection backbone,
and the backbone part of the original's released detectors.

Two layouts exist (docs/facts.md, "Checkpoint layouts"):

* MSRA original: ``patch_embed.{0,2,4,6}``, ``blocks{1,2,3}.*``, Conv2d_BN children ``c``/``bn``;
  ``blocks2``/``blocks3`` start with [res dw+FFN, PatchMerging, res dw+FFN] then the blocks.
* timm: ``patch_embed.conv1..4``, ``stages.{i}.downsample.{res1,patchmerge,res2}``,
  ``stages.{i}.blocks.{j}``, ConvNorm children ``conv``/``bn`` (our own names).

Both may be wrapped (``model``/``state_dict``/``module.``/``backbone.``) and both carry
classifier keys and, at 224 px, a stage-3 bias table of (heads, 16): it is resized
bicubically to the backbone's 7x7 table.

The released detectors of the original code (mmdet 2.x; docs/model_zoo.md) hold the backbone
in the MSRA layout under ``backbone.``, with the persistent ``attention_bias_idxs`` buffers, and
the neck under the original's names. :func:`msra_keys_to_ours` renames such keys in place; the
backbone and the neck call it (and the neck's counterpart) from ``_load_from_state_dict``, so
every loader (mmengine's ``load_checkpoint``, ``load_from``, ``DetInferencer``) takes the files
as they are, and :func:`efficientvit_det.checkpoint.detector.convert_detector_checkpoint`
rewrites a whole file to our layout.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger, print_log
from torch import Tensor, nn

from efficientvit_det.ops.windows import relative_position_index

from .safe_load import load_checkpoint_file

LAYOUTS = ('msra', 'timm')
_CLASSIFIER_PREFIXES = ('head.', 'head_dist.', 'dist_head.', 'fc.', 'classifier.')
_MSRA_KEY = re.compile(r'(patch_embed\.\d+|blocks[123]\.\d+)\.')
_BIAS_IDXS = 'attention_bias_idxs'


class CheckpointLayoutError(ValueError):
    """The checkpoint is not an EfficientViT backbone in a layout we know."""


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


# ---------------------------------------------------------------------------------------------
# detector checkpoints of the original code (mmdet 2.x)
# ---------------------------------------------------------------------------------------------
class KeyConversion(NamedTuple):
    """What :func:`msra_keys_to_ours` (or the neck's counterpart) did to a state dict."""
    renamed: int
    dropped: List[str]
    errors: List[str]


def has_msra_keys(state_dict: Mapping[str, Tensor], prefix: str = '') -> bool:
    """Whether ``state_dict`` holds backbone keys in the MSRA layout under ``prefix``."""
    n = len(prefix)
    return any(k.startswith(prefix) and _MSRA_KEY.match(k[n:]) for k in state_dict)


def msra_keys_to_ours(state_dict: Dict[str, Tensor], prefix: str = '') -> KeyConversion:
    """Rename the MSRA-layout backbone keys under ``prefix`` to ours, in place.

    The ``attention_bias_idxs`` buffers are dropped (ours are computed and not saved); one
    that differs from the index our attention uses is reported in ``errors``, since the
    weights would then belong to another attention geometry. Keys with no counterpart are
    left as they are (the loader reports them as unexpected); bias tables keep their shape.
    """
    n = len(prefix)
    renamed, dropped, errors = 0, [], []
    for key in [k for k in state_dict if k.startswith(prefix) and _MSRA_KEY.match(k[n:])]:
        rest = key[n:]
        if rest.endswith(_BIAS_IDXS):
            idxs = state_dict.pop(key)
            dropped.append(key)
            side = int(round(idxs.shape[-1] ** 0.5))
            if idxs.dim() != 2 or side * side != idxs.shape[-1] or \
                    not torch.equal(idxs.long().cpu(), relative_position_index(side)):
                errors.append(f'{key}: the attention bias index in the checkpoint is not the '
                              f'|dy| * ws + |dx| index of a square window (shape '
                              f'{tuple(idxs.shape)}); these weights belong to another '
                              'attention geometry')
            continue
        new = _msra_key(rest)
        if new is None:
            continue
        if prefix + new in state_dict:
            errors.append(f'{key} maps to {prefix + new}, which the checkpoint also holds: '
                          'mixed MSRA and timm layouts')
            continue
        state_dict[prefix + new] = state_dict.pop(key)
        renamed += 1
    return KeyConversion(renamed, dropped, errors)


def resize_bias_tables_(state_dict: Dict[str, Tensor], prefix: str, model: nn.Module) -> List[str]:
    """Resize bias tables under ``prefix`` whose length differs from ``model``'s (same heads),
    in place, as the original's loader does; returns the keys resized."""
    resized = []
    for name, param in model.named_parameters():
        key = prefix + name
        value = state_dict.get(key)
        if name.endswith('attention_biases') and value is not None and value.dim() == 2 \
                and value.shape != param.shape and value.shape[0] == param.shape[0]:
            state_dict[key] = resize_attention_bias(value, int(round(param.shape[1] ** 0.5)))
            resized.append(key)
    return resized


def log_conversion(what: str, prefix: str, conversion: KeyConversion, extra: str = '') -> None:
    """One log line per load saying what was converted (nothing when nothing was)."""
    if not conversion.renamed and not conversion.dropped:
        return
    where = prefix.rstrip('.') or 'model'
    msg = f"{where}: converted {conversion.renamed} keys of {what} to this project's layout"
    if conversion.dropped:
        msg += f'; dropped {len(conversion.dropped)} attention_bias_idxs buffers (recomputed)'
    print_log(msg + extra, logger='current')


def load_msra_keys_hook(model: nn.Module, state_dict: Dict[str, Tensor], prefix: str,
                        error_msgs: List[str]) -> None:
    """The backbone's ``_load_from_state_dict`` step: MSRA-layout keys under ``prefix`` are
    renamed (and bias tables of another length resized) before torch matches the keys."""
    if not has_msra_keys(state_dict, prefix):
        return
    conversion = msra_keys_to_ours(state_dict, prefix)
    resized = resize_bias_tables_(state_dict, prefix, model)
    error_msgs.extend(conversion.errors)
    log_conversion('the original (MSRA) EfficientViT', prefix, conversion,
                   f'; resized {len(resized)} bias tables to the 7x7 window' if resized else '')
