"""Whole detector checkpoints: loading one into a built detector (:func:`load_detector_checkpoint`),
saying in one line why one does not fit a config (:func:`checkpoint_mismatch`: backbone arch,
number of classes, missing / unexpected key groups), and rewriting those of the original
EfficientViT code (mmdet 2.x) to this project's layout: the backbone's MSRA keys and the neck's
original names renamed (the same functions the modules' ``_load_from_state_dict`` hooks use),
mmdet 2 meta converted, the optimizer left out. ``tools/convert_checkpoint.py`` writes the
result to a file for good.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mmengine.logging import print_log
from torch import Tensor, nn

from efficientvit_det.archs import ARCH_SETTINGS

from .backbone import CheckpointLayoutError, has_msra_keys, infer_arch, msra_keys_to_ours, resize_bias_tables_
from .neck import original_neck_keys_to_ours
from .safe_load import load_checkpoint_file

__all__ = ['CheckpointMismatchError', 'arch_name', 'checkpoint_mismatch', 'convert_detector_checkpoint',
           'convert_detector_meta', 'detector_state_dict', 'is_detector_checkpoint',
           'load_detector_checkpoint']

NOT_STRICT_HINT = ('use the config the checkpoint was trained with, or load only the tensors '
                   'that fit (fine-tuning): --no-strict')


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose tensors do not fit the model built from the config; the message is
    one line naming the difference (arch, number of classes, key groups)."""


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


def detector_state_dict(checkpoint: Any, source: str = 'checkpoint') -> Dict[str, Tensor]:
    """The state dict of a loaded checkpoint (Runner dict or bare state dict), ``module.``
    (DDP) prefix stripped; :class:`CheckpointLayoutError` when it holds none."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state \
            or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointLayoutError(f'{source}: no state dict of tensors found '
                                    f'(got {type(checkpoint).__name__})')
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# does a checkpoint fit a model? one line that says why not
# ---------------------------------------------------------------------------------------------
def _in_our_layout(sd: Dict[str, Tensor], target: nn.Module, whole: bool) -> Dict[str, Tensor]:
    """A copy renamed as the modules' load hooks rename (the original's MSRA backbone keys,
    bias tables resized to the window, the original neck names), so the comparison sees what
    ``load_state_dict`` will see; ``whole``: a detector state dict, else a backbone's."""
    sd = dict(sd)
    prefix = 'backbone.' if whole else ''
    if has_msra_keys(sd, prefix):
        msra_keys_to_ours(sd, prefix)
        resize_bias_tables_(sd, prefix, target.backbone if whole else target)
    if whole:
        original_neck_keys_to_ours(sd, 'neck.')
    return {k: v for k, v in sd.items() if not k.endswith('attention_bias_idxs')}


def arch_name(dims: Sequence[int], depths: Sequence[int]) -> str:
    """The preset ('m0'..'m5') with these embed dims and depths, or ``'custom'``."""
    for name, arch in ARCH_SETTINGS.items():
        if tuple(arch['embed_dims']) == tuple(dims) and tuple(arch['depths']) == tuple(depths):
            return name
    return 'custom'


def _describe_arch(dims: Sequence[int], depths: Sequence[int]) -> str:
    return (f'{arch_name(dims, depths)} (embed_dims {"/".join(map(str, dims))}, depths '
            f'{"/".join(map(str, depths))})')


def _arch_difference(model_sd: Mapping[str, Tensor], ckpt_sd: Mapping[str, Tensor],
                     prefix: str) -> Optional[str]:
    """``arch m0 (...) in the checkpoint, m4 (...) in the config`` when both hold an
    EfficientViT backbone of different embed dims / depths."""
    n = len(prefix)
    ours = infer_arch({k[n:]: v for k, v in model_sd.items() if k.startswith(prefix)})
    theirs = infer_arch({k[n:]: v for k, v in ckpt_sd.items() if k.startswith(prefix)})
    if -1 in ours[0] or -1 in theirs[0] or ours == theirs:
        return None
    return (f'backbone arch {_describe_arch(*theirs)} in the checkpoint, '
            f'{_describe_arch(*ours)} in the config')


_CLS_KEY = re.compile(r'(^|\.)(retina_cls|fc_cls|conv_cls|atss_cls|gfl_cls|rtm_cls(\.\d+)?|'
                      r'cls_branches\.\d+|conv_logits)\.(weight|bias)$')


def _num_classes(model: nn.Module) -> Optional[int]:
    for head in (getattr(model, 'bbox_head', None),
                 getattr(getattr(model, 'roi_head', None), 'bbox_head', None)):
        n = getattr(head, 'num_classes', None)
        if isinstance(n, int):
            return n
    return None


def _classes_difference(model: nn.Module, wrong_shape: Sequence[Tuple[str, tuple, tuple]],
                        ckpt_classes: Optional[Sequence[str]]) -> Optional[str]:
    """``6 classes in the checkpoint (circle, ...), 80 in the config`` from the first
    classification layer of another shape (its output count = classes x priors, or
    classes + 1 for a background class)."""
    n_model = _num_classes(model)
    cls = next(((k, c, m) for k, c, m in wrong_shape if _CLS_KEY.search(k)), None)
    if n_model is None or cls is None:
        return None
    key, c_shape, m_shape = cls
    c_out, m_out = c_shape[0], m_shape[0]
    if m_out == n_model + 1:
        n_ckpt = c_out - 1
    elif m_out % n_model == 0 and c_out * n_model % m_out == 0:
        n_ckpt = c_out * n_model // m_out
    else:
        return f'{key} has {c_out} outputs in the checkpoint, {m_out} in the config'
    names = ''
    if ckpt_classes and len(ckpt_classes) == n_ckpt:
        shown = ', '.join(map(str, ckpt_classes[:6])) + (', ...' if n_ckpt > 6 else '')
        names = f' ({shown})'
    return f'{n_ckpt} classes in the checkpoint{names}, {n_model} in the config'


def _groups(keys: Sequence[str], limit: int = 4) -> str:
    """``roi_head.mask_head.* (8), neck.trans_convs.* (2)``: keys summarised by prefix."""
    counts = Counter('.'.join(k.split('.')[:2 if k.count('.') >= 2 else 1]) for k in keys)
    parts = [f'{p}.* ({n})' for p, n in counts.most_common(limit)]
    if len(counts) > limit:
        parts.append(f'{len(counts) - limit} more groups')
    return ', '.join(parts)


def checkpoint_mismatch(model: nn.Module, checkpoint: Any,
                        source: str = 'checkpoint') -> Optional[str]:
    """Why ``checkpoint`` (a loaded checkpoint or state dict) does not fit ``model``, as one
    line, or ``None`` when every tensor fits (the keys the modules rename on load, e.g. the
    original's released files, and bias tables of another window length count as fitting).

    Named, in this order: the backbone arch (embed dims / depths), the number of classes (the
    classification layer's shape, class names from the checkpoint's meta), then the tensors of
    another shape and the missing / unexpected keys, summarised by prefix.
    """
    sd = detector_state_dict(checkpoint, source)
    whole = any(k.startswith('backbone.') for k in sd)
    target = model if whole or not hasattr(model, 'backbone') else model.backbone
    prefix = 'backbone.' if target is model else ''
    ckpt_sd = _in_our_layout(sd, target, whole=target is model)
    model_sd = target.state_dict()
    wrong_shape = [(k, tuple(v.shape), tuple(model_sd[k].shape)) for k, v in ckpt_sd.items()
                   if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    if not (wrong_shape or missing or unexpected):
        return None
    meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
    classes = (convert_detector_meta(meta).get('dataset_meta') or {}).get('classes') \
        if isinstance(meta, Mapping) else None
    parts = [p for p in (_arch_difference(model_sd, ckpt_sd, prefix),
                         _classes_difference(target, wrong_shape, classes)) if p]
    if wrong_shape:
        parts.append(f'{len(wrong_shape)} tensors of another shape: '
                     f'{_groups([k for k, _, _ in wrong_shape])}')
    if missing:
        parts.append(f'{len(missing)} tensors missing from the checkpoint: {_groups(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected tensors in the checkpoint: '
                     f'{_groups(unexpected)}')
    into = '' if target is model else ' (a backbone checkpoint, loaded into model.backbone)'
    return f'{source} does not fit the model{into}: ' + '; '.join(parts)


def _fitting_tensors(target: nn.Module, sd: Dict[str, Tensor], whole: bool) -> Dict[str, Tensor]:
    """The tensors of ``sd`` (renamed to our layout) that ``target`` can take."""
    model_sd = target.state_dict()
    return {k: v for k, v in _in_our_layout(sd, target, whole).items()
            if k in model_sd and tuple(v.shape) == tuple(model_sd[k].shape)}


def load_detector_checkpoint(model: nn.Module, checkpoint: str, strict: bool = True) -> dict:
    """Load a detector checkpoint into ``model`` through the one safe loader; returns its meta.

    Runner checkpoints (``state_dict`` + ``meta``) and bare state dicts are accepted, a
    ``module.`` prefix (DDP) is stripped, and a checkpoint whose keys have no ``backbone.``
    prefix (``tools/convert_checkpoint.py`` output) goes into the backbone alone. The
    original's released files load as they are (the modules' ``_load_from_state_dict`` rename
    their keys). Class names come from ``meta['dataset_meta']`` (mmdet 3) or
    ``meta['CLASSES']`` (mmdet 2).

    ``strict``: a checkpoint that does not fit raises :class:`CheckpointMismatchError` with
    :func:`checkpoint_mismatch`'s line; otherwise only the tensors that fit are loaded and that
    line is logged as a warning (fine-tuning on other classes).
    """
    ckpt = load_checkpoint_file(checkpoint)
    sd = detector_state_dict(ckpt, checkpoint)
    problem = checkpoint_mismatch(model, ckpt, checkpoint)
    if problem and strict:
        raise CheckpointMismatchError(f'{problem}; {NOT_STRICT_HINT}')
    target = model if any(k.startswith('backbone.') for k in sd) else model.backbone
    if problem:
        print_log(f'{problem}; loading only the tensors that fit (strict=False)',
                  logger='current', level=30)
        target.load_state_dict(_fitting_tensors(target, sd, target is model), strict=False)
    else:
        target.load_state_dict(sd, strict=True)
    meta = ckpt.get('meta', {}) if isinstance(ckpt, Mapping) else {}
    meta = meta if isinstance(meta, Mapping) else {}
    dataset_meta = convert_detector_meta(meta).get('dataset_meta')
    if dataset_meta:
        model.dataset_meta = {k.lower(): v for k, v in dataset_meta.items()}
    return dict(meta)
