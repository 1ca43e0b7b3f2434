"""EfficientViTFPN: mmdet's FPN plus transposed-conv levels finer than the backbone's.

EfficientViT's stages start at stride 16. The original detection code adds
``num_extra_trans_convs`` levels below it: the top-down stride-16 lateral goes through a
2x2 stride-2 ConvTranspose2d (with bias) and its own 3x3 conv, giving stride 8; a second
one chains on the first's ConvTranspose output, giving stride 4 (docs/facts.md, "Neck").

Checkpoints of the original code name those modules ``extra_trans_convs.{j}.conv`` (an mmcv
ConvModule around the ConvTranspose2d) and ``extra_fpn_convs.{i}``; its ``extra_fpn_convs``
run finest level first, so ``extra_fpn_convs.{i}`` is our ``trans_fpn_convs.{n - 1 - i}``.
``_load_from_state_dict`` renames them, so those files load into this module as they are.
Our names stay as they were: checkpoints written by this project keep loading unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from torch import Tensor, nn

from efficientvit_det.checkpoint.backbone import log_conversion
from efficientvit_det.checkpoint.neck import original_neck_keys_to_ours
from efficientvit_det.registry import MODELS


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

    def _top_down(self, inputs: Sequence[Tensor]) -> List[Tensor]:
        """The laterals after mmdet's top-down pass (``upsample_cfg`` honoured)."""
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            if 'scale_factor' in self.upsample_cfg:
                up = F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], **self.upsample_cfg)
            laterals[i - 1] = laterals[i - 1] + up
        return laterals

    def _fpn_outputs(self, inputs: Sequence[Tensor], laterals: List[Tensor]) -> List[Tensor]:
        """mmdet's FPN outputs: a 3x3 conv per lateral, then the extra levels."""
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used and not self.add_extra_convs:
            for _ in range(self.num_outs - used):  # each pools the one before (mmdet's FPN)
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        elif self.num_outs > used:
            source = {'on_input': lambda: inputs[self.backbone_end_level - 1],
                      'on_lateral': lambda: laterals[-1],
                      'on_output': lambda: outs[-1]}[self.add_extra_convs]()
            outs.append(self.fpn_convs[used](source))
            for i in range(used + 1, self.num_outs):
                x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self.fpn_convs[i](x))
        return outs

    def forward(self, inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """mmdet's FPN forward (the same steps, as two methods), then the transposed-conv
        levels grown from the finest lateral after the top-down pass."""
        self._check_inputs(inputs)
        laterals = self._top_down(inputs)
        outs = self._fpn_outputs(inputs, laterals)
        x = laterals[0]
        finer: List[Tensor] = []
        for deconv, conv in zip(self.trans_convs, self.trans_fpn_convs):
            x = deconv(x)
            finer.insert(0, conv(x))
        return tuple(finer) + tuple(outs)
