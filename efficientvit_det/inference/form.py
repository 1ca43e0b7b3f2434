"""The inference form of a detector: deploy mode + precision, applied in one call.

Every inference path runs what :func:`prepare_inference` makes: ``tools/infer.py``
(:func:`efficientvit_det.apis.detect_images`), ``tools/test.py``
(:class:`efficientvit_det.engine.InferenceOptimizationHook`) and the benchmarks, so a
published time is the time of what the tools run.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from efficientvit_det.deploy.mode import deploy_model

from .precision import Precision, log_precision_once, prepare_model, resolve_precision

__all__ = ['model_precision', 'prepare_inference']


def model_precision(model: nn.Module, precision: str = 'auto') -> Precision:
    """``precision`` (``auto`` | ``fp32`` | ``bf16``) resolved for the device ``model``'s
    weights are on (:func:`efficientvit_det.inference.precision.resolve_precision`)."""
    param = next(model.parameters(), None)
    return resolve_precision(precision, param.device if param is not None else torch.device('cpu'))


def prepare_inference(model: nn.Module, precision: Union[str, Precision] = 'auto',
                      deploy: bool = True, log: bool = True) -> Precision:
    """Put a built detector (eval mode, weights loaded) in its inference form, in place.

    ``deploy``: deploy mode (:func:`efficientvit_det.deploy.deploy_model`: BatchNorms folded,
    conv+ReLU merged; outputs equal the unfused model's). ``precision``: ``auto`` | ``fp32``
    | ``bf16``, resolved for the model's device (:func:`efficientvit_det.inference.
    precision.resolve_precision`) and applied (:func:`efficientvit_det.inference.precision.prepare_model`:
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
