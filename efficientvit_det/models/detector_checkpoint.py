"""Whole detector checkpoints of the original EfficientViT code (mmdet 2.x) in this project's
layout: the backbone's MSRA keys and the neck's original names renamed (the same functions the
modules' ``_load_from_state_dict`` hooks use), mmdet 2 meta converted, the optimizer left out.
``tools/convert_checkpoint.py`` writes the result to a file for good.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from torch import Tensor

from efficientvit_det.models.backbones.efficientvit_checkpoint import CheckpointLayoutError, msra_keys_to_ours
from efficientvit_det.models.necks.efficientvit_fpn import original_neck_keys_to_ours

__all__ = ['convert_detector_checkpoint', 'convert_detector_meta', 'is_detector_checkpoint']


_MMDET2_META_DROP = ('CLASSES', 'PALETTE')


def convert_detector_meta(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """mmdet 2 meta -> mmdet 3: ``CLASSES`` (and ``PALETTE``) become ``dataset_meta``; the
    other plain entries (mmdet_version, config text, epoch, ...) are kept under
    ``source_meta``."""
    out: Dict[str, Any] = {}
    if meta.get('dataset_meta'):
        out['dataset_meta'] = dict(meta['dataset_meta'])
    elif meta.get('CLASSES'):
        out['dataset_meta'] = {'classes': tuple(meta['CLASSES'])}
        if meta.get('PALETTE'):
            out['dataset_meta']['palette'] = list(meta['PALETTE'])
    source = {k: v for k, v in meta.items()
              if k not in _MMDET2_META_DROP and k != 'dataset_meta'}
    if source:
        out['source_meta'] = source
    return out


def is_detector_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint holds a whole detector (``backbone.*`` keys, maybe under a
    ``module.`` prefix) rather than a classification / backbone state dict."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, Mapping) else None
    return isinstance(state, Mapping) and any(
        isinstance(k, str) and re.sub(r'^module\.', '', k).startswith('backbone.') for k in state)


def convert_detector_checkpoint(checkpoint: Mapping[str, Any]) -> Tuple[dict, List[str]]:
    """A detector checkpoint of the original code (or ours) rewritten to our layout.

    Returns ``({'state_dict', 'meta'}, report lines)``: a ``module.`` prefix is stripped,
    the backbone (MSRA layout) and neck (original names) keys are renamed, the bias index
    buffers are dropped, ``meta`` is converted by :func:`convert_detector_meta` and the
    optimizer state is left out (it belongs to the old parameter order and names).
    Raises :class:`CheckpointLayoutError` when the file is no detector checkpoint or a
    buffer contradicts our attention.
    """
    state = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointLayoutError('no state dict of tensors in the checkpoint (top-level keys: '
                                    f'{list(checkpoint)[:10]})')
    sd = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    if not any(k.startswith('backbone.') for k in sd):
        raise CheckpointLayoutError('not a detector checkpoint: no backbone.* keys (for a '
                                    'classification checkpoint pass --arch instead)')
    backbone = msra_keys_to_ours(sd, 'backbone.')
    neck = original_neck_keys_to_ours(sd, 'neck.')
    errors = backbone.errors + neck.errors
    if errors:
        raise CheckpointLayoutError('; '.join(errors))
    report = [f'backbone: {backbone.renamed} keys renamed from the MSRA layout, '
              f'{len(backbone.dropped)} attention_bias_idxs buffers dropped',
              f'neck: {neck.renamed} keys renamed from the original EfficientViTFPN names']
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), Mapping) else {}
    meta = convert_detector_meta(meta)
    if 'optimizer' in checkpoint:
        report.append('optimizer state left out')
    return {'state_dict': sd, 'meta': meta}, report
