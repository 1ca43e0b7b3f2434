"""EfficientViTFPN: mmdet's FPN plus transposed-conv levels finer than the backbone's.

EfficientViT's stages start at stride 16. The original detection code adds
``num_extra_trans_convs`` levels below it: the top-down stride-16 lateral goes through a
2x2 stride-2 ConvTranspose2d (with bias) and its own 3x3 conv, giving stride 8; a second
one chains on the first's ConvTranspose output, giving stride 4 (docs/design.md, "Neck").

Checkpoints of the original code name those modules ``extra_trans_convs.{j}.conv`` (an mmcv
ConvModule around the ConvTranspose2d) and ``extra_fpn_convs.{i}``; its ``extra_fpn_convs``
run finest level first, so ``extra_fpn_convs.{i}`` is our ``trans_fpn_convs.{n - 1 - i}``.
``_load_from_state_dict`` renames them, so those files load into this module as they are.
Our names stay as they were: checkpoints written by this project keep loading unchanged.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from torch import Tensor, nn

from efficientvit_det.models.backbones.efficientvit_checkpoint import KeyConversion, log_conversion
from efficientvit_det.registry import MODELS

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


@MODELS.register_module()
class EfficientViTFPN(FPN):
    """FPN with ``num_extra_trans_convs`` upsampled levels in front.

    Args:
        in_channels: channels of each backbone map used (must equal the backbone's
            ``out_channels``).
        out_channels: channels of every output level.
        num_outs: total number of outputs, the transposed-conv levels included.
        num_extra_trans_convs: levels added below the finest used backbone level
            (0, 1 or more), each at half the stride of the previous one.
        **kwargs: the rest of mmdet's :class:`FPN` arguments (``start_level``,
            ``add_extra_convs``, ``norm_cfg``, ...).

    RetinaNet-m4: in_channels [128, 256, 384], out 256, num_outs 5,
    one trans conv, add_extra_convs 'on_input' -> strides 8, 16, 32, 64, 128.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int,
                 num_extra_trans_convs: int = 0,
                 init_cfg: Optional[dict] = None, **kwargs):
        if num_extra_trans_convs < 0:
            raise ValueError(f'num_extra_trans_convs must be >= 0, got {num_extra_trans_convs}')
        if num_outs - num_extra_trans_convs < 1:
            raise ValueError(f'num_outs ({num_outs}) must exceed num_extra_trans_convs '
                             f'({num_extra_trans_convs})')
        if init_cfg is None:  # mmdet FPN's, extended to the transposed convs
            init_cfg = dict(type='Xavier', layer=['Conv2d', 'ConvTranspose2d'],
                            distribution='uniform')
        super().__init__(list(in_channels), out_channels, num_outs - num_extra_trans_convs,
                         init_cfg=init_cfg, **kwargs)
        self.num_extra_trans_convs = num_extra_trans_convs
        self.trans_convs = nn.ModuleList(
            nn.ConvTranspose2d(out_channels, out_channels, 2, stride=2)
            for _ in range(num_extra_trans_convs))
        self.trans_fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=kwargs.get('conv_cfg'),
                       norm_cfg=kwargs.get('norm_cfg'), act_cfg=kwargs.get('act_cfg'), inplace=False)
            for _ in range(num_extra_trans_convs))
        if num_extra_trans_convs:
            self.fpn_convs[0].register_forward_pre_hook(_keep_top_down_input)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints of the original code: rename before the keys are matched (torch's way
        # of loading older state layouts, cf. BatchNorm's num_batches_tracked)
        conversion = original_neck_keys_to_ours(state_dict, prefix, self.num_extra_trans_convs)
        error_msgs.extend(conversion.errors)
        log_conversion('the original EfficientViTFPN', prefix, conversion)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_inputs(self, inputs: Sequence[Tensor]) -> None:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'EfficientViTFPN got {len(inputs)} feature maps but in_channels has '
                             f'{len(self.in_channels)} entries; match neck.in_channels to the '
                             'backbone out_indices')
        got = [x.shape[1] for x in inputs]
        if got != list(self.in_channels):
            raise ValueError(f'EfficientViTFPN in_channels={list(self.in_channels)} but the backbone '
                             f'gives {got} channels; set neck.in_channels={got}')

    def forward(self, inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        self._check_inputs(inputs)
        outs = super().forward(inputs)  # mmdet's FPN: top-down pass, output convs, extra levels
        if not self.num_extra_trans_convs:
            return outs
        # the finest lateral after the top-down pass: the input mmdet's forward gave fpn_convs[0]
        x = self.fpn_convs[0].__dict__.pop(_TOP_DOWN_INPUT)
        finer: List[Tensor] = []
        for deconv, conv in zip(self.trans_convs, self.trans_fpn_convs):
            x = deconv(x)
            finer.insert(0, conv(x))
        return tuple(finer) + tuple(outs)


_TOP_DOWN_INPUT = '_efficientvit_top_down_input'


def _keep_top_down_input(module: nn.Module, args: Tuple[Tensor, ...]) -> None:
    """Forward pre-hook of ``fpn_convs[0]``: keep its input for the transposed convs."""
    module.__dict__[_TOP_DOWN_INPUT] = args[0]
