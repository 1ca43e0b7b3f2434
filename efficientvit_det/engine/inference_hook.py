"""``InferenceOptimizationHook``: deploy mode and the inference precision in a Runner's test.

``tools/test.py`` adds it (``--precision``, ``--no-fuse``); a config can add it too::

    custom_hooks = [dict(type='InferenceOptimizationHook', precision='auto', deploy=True)]

At ``before_test`` (weights loaded, before the first batch) it puts the detector in deploy mode
(:func:`efficientvit_det.deploy.deploy_model`), resolves the precision for the model's device
(:func:`efficientvit_det.inference.resolve_precision`: ``auto`` = bf16 on CPUs with native
bf16, fp32 elsewhere), prepares the model for it (channels_last, float32 head outputs) and
switches the test loop's autocast (mmengine's ``TestLoop(fp16=True)``, which autocasts to
bf16 on CPU) on or off accordingly. Validation during training is left alone: deploy mode is
for a model that will not train again.
"""
from __future__ import annotations

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from efficientvit_det.inference import PRECISIONS, Precision, model_precision, prepare_inference
from efficientvit_det.registry import HOOKS

__all__ = ['InferenceOptimizationHook']


def _detector(model: nn.Module) -> nn.Module:
    """The detector inside DDP and test-time-augmentation wrappers."""
    if is_model_wrapper(model):
        model = model.module
    inner = getattr(model, 'module', None)  # mmengine's BaseTTAModel keeps it in .module
    return inner if isinstance(inner, nn.Module) else model


@HOOKS.register_module()
class InferenceOptimizationHook(Hook):
    """Deploy mode + ``precision`` (``auto`` | ``fp32`` | ``bf16``) for the test loop."""

    priority = 'VERY_HIGH'

    def __init__(self, precision: str = 'auto', deploy: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f'InferenceOptimizationHook: precision must be one of '
                             f'{", ".join(PRECISIONS)}, got {precision!r}')
        self.precision = precision
        self.deploy = bool(deploy)
        self.choice = None

    def before_test(self, runner) -> None:
        detector = _detector(runner.model)
        choice = model_precision(detector, self.precision)
        loop = runner.test_loop
        if choice.name == 'bf16' and not hasattr(loop, 'fp16'):
            raise TypeError(f'{type(loop).__name__} has no fp16 (autocast) switch; use '
                            "mmengine's TestLoop for bf16, or precision='fp32'")
        prepare_inference(detector, choice, self.deploy)
        if hasattr(loop, 'fp16'):
            loop.fp16 = choice.name == 'bf16'
        if choice.name == 'bf16' and choice.device_type == 'cuda':
            # mmengine's autocast takes torch's default CUDA dtype (float16) when given none
            torch.set_autocast_dtype('cuda', torch.bfloat16)
        self.choice: Precision = choice
        runner.logger.info(f'test: deploy mode {"on" if self.deploy else "off"}')
