"""Deploy mode of a whole detector: a graph transform with outputs equal to the model's.

``deploy_model(model)``: ``eval()``; the EfficientViT backbone's ``fuse()`` (every Conv+BN
folded, every conv that feeds a ReLU merged with it) or mmcv's ``fuse_conv_bn`` for another
backbone; every ``ConvModule`` of the neck and head whose BatchNorm directly follows its conv
folded into the conv. Outputs equal the unfused model's (BatchNorms in eval mode compute an
affine map, which the conv absorbs).
"""
from __future__ import annotations

import torch
from torch import nn

from efficientvit_det.models.backbones.efficientvit import fold_bn

__all__ = ['deploy_model']


def _foldable(m: nn.Module) -> bool:
    from mmcv.cnn import ConvModule
    return (isinstance(m, ConvModule) and m.with_norm
            and isinstance(m.norm, nn.modules.batchnorm._BatchNorm)
            and type(m.conv) is nn.Conv2d and m.norm.track_running_stats
            and m.order.index('norm') == m.order.index('conv') + 1)


@torch.no_grad()
def deploy_model(model: nn.Module) -> nn.Module:
    """Put ``model`` (a detector or a bare backbone) in deploy mode, in place; returns it.

    A BatchNorm that cannot be folded (none in this project's configs) stays and runs in eval
    mode, which is still exact.
    """
    model.eval()
    backbone = getattr(model, 'backbone', model)
    if hasattr(backbone, 'fuse'):
        backbone.fuse()
    elif backbone is not model:
        # another mmdet backbone (e.g. ResNet: each conv's BN is its next child), as mmdet's
        # own ``--fuse-conv-bn`` does
        from mmcv.cnn import fuse_conv_bn
        fuse_conv_bn(backbone)
    for m in model.modules():
        if _foldable(m):
            weight, bias = fold_bn(m.conv.weight, m.conv.bias, m.norm)
            m.conv.weight.copy_(weight)
            m.conv.bias = nn.Parameter(bias)
            setattr(m, m.norm_name, nn.Identity())
            m.with_norm = False
    return model.eval()
