"""Deploy mode of a whole detector, and the inference form (deploy mode + precision) that
``tools/infer.py``, ``tools/test.py`` and ``DetInferencer`` users run.

``deploy_model(model)``: ``eval()``; the EfficientViT backbone's ``fuse()`` (every Conv+BN folded,
every conv that feeds a ReLU merged with it); every ``ConvModule`` of the neck and head whose
BatchNorm directly follows its conv folded into the conv. Outputs equal the unfused model's
(BatchNorms in eval mode compute an affine map, which the conv absorbs).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from efficientvit_det.models.backbones.efficientvit import fold_bn
from efficientvit_det.precision import Precision, log_precision_once, prepare_model, resolve_precision

__all__ = ['deploy_model', 'model_precision', 'prepare_inference']


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
    for m in model.modules():
        if _foldable(m):
            weight, bias = fold_bn(m.conv.weight, m.conv.bias, m.norm)
            m.conv.weight.copy_(weight)
            m.conv.bias = nn.Parameter(bias)
            setattr(m, m.norm_name, nn.Identity())
            m.with_norm = False
    return model.eval()


def model_precision(model: nn.Module, precision: str = 'auto') -> Precision:
    """``precision`` (``auto`` | ``fp32`` | ``bf16``) resolved for the device ``model``'s
    weights are on (:func:`efficientvit_det.precision.resolve_precision`)."""
    param = next(model.parameters(), None)
    return resolve_precision(precision, param.device if param is not None else torch.device('cpu'))


def prepare_inference(model: nn.Module, precision: Union[str, Precision] = 'auto',
                      deploy: bool = True, log: bool = True) -> Precision:
    """Put a built detector (eval mode, weights loaded) in its inference form, in place.

    ``deploy``: deploy mode (:func:`efficientvit_det.deploy.deploy_model`: BatchNorms folded,
    conv+ReLU merged; outputs equal the unfused model's). ``precision``: ``auto`` | ``fp32``
    | ``bf16``, resolved for the model's device (:func:`efficientvit_det.precision.
    resolve_precision`) and applied (:func:`efficientvit_det.precision.prepare_model`:
    channels_last for bf16, head outputs back to float32). Returns the :class:`Precision`;
    run the forward inside its ``autocast()``::

        choice = prepare_inference(inferencer.model)      # e.g. mmdet's DetInferencer
        with choice.autocast():
            result = inferencer(images)

    ``precision`` may also be an already resolved :class:`Precision`. ``log``: log which
    precision runs and why (once per process).
    """
    choice = precision if isinstance(precision, Precision) else model_precision(model, precision)
    if deploy:
        deploy_model(model)
    prepare_model(model, choice)
    if log:
        log_precision_once(choice)
    return choice
