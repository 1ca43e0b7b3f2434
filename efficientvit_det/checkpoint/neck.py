"""Neck key layout: the original EfficientViTFPN's transposed-conv levels (mmdet 2.x checkpoints)
in this project's names. ``EfficientViTFPN._load_from_state_dict`` and
:func:`efficientvit_det.checkpoint.detector.convert_detector_checkpoint` call it.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

from torch import Tensor

from .backbone import KeyConversion

__all__ = ['original_neck_keys_to_ours']

_ORIGINAL_TRANS = re.compile(r'extra_trans_convs\.(\d+)\.conv\.(weight|bias)$')
_ORIGINAL_TRANS_FPN = re.compile(r'extra_fpn_convs\.(\d+)\.(.+)$')


def original_neck_keys_to_ours(state_dict: Dict[str, Tensor], prefix: str = '',
                               num_extra_trans_convs: Optional[int] = None) -> KeyConversion:
    """Rename the original EfficientViTFPN's transposed-conv keys under ``prefix``, in place.

    ``extra_trans_convs.{j}.conv.*`` -> ``trans_convs.{j}.*``;
    ``extra_fpn_convs.{i}.*`` -> ``trans_fpn_convs.{n - 1 - i}.*`` (the original applies
    ``extra_fpn_convs[i]`` to the i-th finest level). ``n`` is ``num_extra_trans_convs``, or
    the number of ``extra_trans_convs`` in the state dict. Other keys (lateral/fpn convs:
    the same names in both) are left alone, as are keys with no counterpart (reported by the
    loader as unexpected).
    """
    p = len(prefix)
    keys = [k for k in state_dict if k.startswith(prefix)]
    if num_extra_trans_convs is None:
        num_extra_trans_convs = len({m.group(1) for k in keys
                                     for m in [_ORIGINAL_TRANS.match(k[p:])] if m})
    renamed, errors = 0, []
    for key in keys:
        m = _ORIGINAL_TRANS.match(key[p:])
        if m:
            new = f'{prefix}trans_convs.{m.group(1)}.{m.group(2)}'
        else:
            m = _ORIGINAL_TRANS_FPN.match(key[p:])
            if not m or int(m.group(1)) >= num_extra_trans_convs:
                continue
            new = f'{prefix}trans_fpn_convs.{num_extra_trans_convs - 1 - int(m.group(1))}.' \
                  f'{m.group(2)}'
        if new in state_dict:
            errors.append(f'{key} maps to {new}, which the checkpoint also holds')
            continue
        state_dict[new] = state_dict.pop(key)
        renamed += 1
    return KeyConversion(renamed, [], errors)
