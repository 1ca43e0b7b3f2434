"""EfficientViTFPN: mmdet's FPN plus transposed-conv levels finer than the backbone's.

EfficientViT's stages start at stride 16. The original detection code adds
``num_extra_trans_convs`` levels below it: the top-down stride-16 lateral goes through a
2x2 stride-2 ConvTranspose2d (with bias) and its own 3x3 conv, giving stride 8; a second
one chains on the first's ConvTranspose output, giving stride 4 (REFERENCE.md section 3).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from torch import Tensor, nn

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

    RetinaNet-m4 (REFERENCE.md): in_channels [128, 256, 384], out 256, num_outs 5,
    one trans conv, add_extra_convs 'on_input' -> strides 8, 16, 32, 64, 128.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int,
                 num_extra_trans_convs: int = 0,
                 init_cfg: dict = dict(type='Xavier', layer=['Conv2d', 'ConvTranspose2d'],
                                       distribution='uniform'),
                 **kwargs):
        if num_extra_trans_convs < 0:
            raise ValueError(f'num_extra_trans_convs must be >= 0, got {num_extra_trans_convs}')
        if num_outs - num_extra_trans_convs < 1:
            raise ValueError(f'num_outs ({num_outs}) must exceed num_extra_trans_convs '
                             f'({num_extra_trans_convs})')
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
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], **self.upsample_cfg)
        outs: List[Tensor] = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        outs += self._extra_levels(inputs, laterals, outs)
        finer = []
        x = laterals[0]
        for deconv, conv in zip(self.trans_convs, self.trans_fpn_convs):
            x = deconv(x)
            finer.insert(0, conv(x))
        return tuple(finer + outs)

    def _extra_levels(self, inputs: Sequence[Tensor], laterals: List[Tensor],
                      outs: List[Tensor]) -> List[Tensor]:
        """Levels above the coarsest backbone level, as mmdet's FPN makes them."""
        used = len(outs)
        if self.num_outs <= used:
            return []
        extra: List[Tensor] = []
        if not self.add_extra_convs:
            x = outs[-1]
            for _ in range(self.num_outs - used):
                x = F.max_pool2d(x, 1, stride=2)
                extra.append(x)
            return extra
        source = {'on_input': inputs[self.backbone_end_level - 1], 'on_lateral': laterals[-1],
                  'on_output': outs[-1]}[self.add_extra_convs]
        extra.append(self.fpn_convs[used](source))
        for i in range(used + 1, self.num_outs):
            x = extra[-1]
            extra.append(self.fpn_convs[i](F.relu(x) if self.relu_before_extra_convs else x))
        return extra
