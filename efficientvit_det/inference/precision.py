"""Inference precision: which CPUs run bf16 natively, the ``auto`` rule, and applying it.

One place for the precision choice of every inference path (through
:func:`efficientvit_det.inference.prepare_inference`: ``tools/infer.py``, ``tools/test.py``'s
:class:`efficientvit_det.engine.InferenceOptimizationHook`, the benchmarks); see
``docs/precision.md``. The CPU's capabilities come from :func:`efficientvit_det.cpu.cpu_info`.

* :func:`resolve_precision`: ``auto`` | ``fp32`` | ``bf16`` for a device -> a :class:`Precision`
  (what runs and why). ``auto`` = bf16 on a CPU whose oneDNN runs bf16 natively (AMX-BF16 or
  AVX512-BF16), fp32 elsewhere, fp32 on CUDA.
* :func:`prepare_model`: what bf16 inference needs on the model, in place: channels_last
  weights and backbone input (oneDNN's bf16 convolutions are fastest in NHWC), and the outputs
  of every head that has ``predict_by_feat`` cast back to float32, so that box decoding, score
  thresholds and NMS run in float32 as in fp32 inference.
* :meth:`Precision.autocast`: the autocast context the forward runs in
  (``torch.autocast(device, torch.bfloat16)``; a no-op for fp32).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, ContextManager, Optional, Set, Union

import torch
from torch import nn

from efficientvit_det.cpu import cpu_info

__all__ = ['PRECISIONS', 'Precision', 'resolve_precision', 'prepare_model', 'log_precision_once']

PRECISIONS = ('auto', 'fp32', 'bf16')
_PREPARED_ATTR = '_efficientvit_det_precision'
_logged: Set[str] = set()


@dataclass(frozen=True)
class Precision:
    """What inference runs in: ``name`` (``fp32`` | ``bf16``) on ``device_type``, and why."""

    name: str
    requested: str
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == 'bf16' else torch.float32

    @property
    def channels_last(self) -> bool:
        """bf16 runs with channels_last weights and inputs (oneDNN's fast bf16 layout)."""
        return self.name == 'bf16'

    def autocast(self) -> ContextManager:
        """The context the forward runs in: bf16 autocast, or nothing for fp32."""
        if self.name == 'bf16':
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def summary(self) -> str:
        layout = ' + channels_last' if self.channels_last else ''
        return f'precision: {self.name}{layout} on {self.device_type} ({self.reason})'


def resolve_precision(precision: str = 'auto',
                      device: Union[str, torch.device] = 'cpu') -> Precision:
    """``precision`` for ``device`` -> a :class:`Precision`.

    ``auto``: CUDA keeps fp32; a CPU whose oneDNN runs bf16 natively (AMX-BF16 or AVX512-BF16,
    see :func:`efficientvit_det.cpu.cpu_info`) gets bf16 autocast + channels_last; other CPUs (no bf16
    instructions: bf16 would be emulated and slower than fp32) get fp32. ``fp32`` / ``bf16``
    are taken as asked; ``bf16`` on a CPU without native support warns that it is slower.
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    device_type = torch.device(device).type
    if device_type not in ('cpu', 'cuda'):
        raise ValueError(f'precision: device must be cpu or cuda, got {device!r}')
    if precision == 'fp32':
        return Precision('fp32', precision, device_type, 'asked for')
    if device_type == 'cuda':
        if precision == 'bf16':
            return Precision('bf16', precision, device_type, 'asked for')
        return Precision('fp32', precision, device_type, 'auto: CUDA keeps fp32')
    support = cpu_info()
    if precision == 'bf16':
        if not support.native_bf16:
            warnings.warn(f'--precision bf16 on a CPU without native bf16 ({support.describe()}): '
                          'bf16 is emulated there and slower than fp32; use auto or fp32',
                          stacklevel=2)
        return Precision('bf16', precision, device_type, f'asked for; {support.describe()}')
    if support.native_bf16:
        return Precision('bf16', precision, device_type,
                         f'auto: {support.bf16_instructions()} present, oneDNN runs bf16 natively')
    why = ('oneDNN has no bf16 on this CPU' if not support.onednn_bf16
           else f'{support.bf16_instructions()}: bf16 would be emulated, slower than fp32')
    return Precision('fp32', precision, device_type, f'auto: {why}')


# ---------------------------------------------------------------------------------------------
# applying it to a model
# ---------------------------------------------------------------------------------------------
def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def _outputs_to_float(module: nn.Module, args: tuple, output: Any) -> Any:
    return _float_tree(output)


def _roi_extractor_inputs(module: nn.Module, args: tuple) -> tuple:
    """Feature maps for mmcv's RoIAlign (Mask R-CNN's RoI extractors): float32 (its CPU kernel
    has no bf16) and NCHW-contiguous (it indexes the raw data as NCHW: channels_last maps
    give wrong features, silently)."""
    feats = tuple(f.float().contiguous() if isinstance(f, torch.Tensor) else f
                  for f in args[0])
    return (feats, *args[1:])


def _is_roi_extractor(module: nn.Module) -> bool:
    from mmdet.models.roi_heads.roi_extractors import BaseRoIExtractor
    return isinstance(module, BaseRoIExtractor)


def _float_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, '_fields'):
        return type(obj)(_float_tree(o) for o in obj)
    return obj


def prepare_model(model: nn.Module, precision: Precision,
                  channels_last: Optional[bool] = None) -> nn.Module:
    """Prepare ``model`` (a detector) for inference in ``precision``, in place; returns it.

    bf16: weights in channels_last, the backbone's input converted to channels_last, and the
    forward outputs of every module with a ``predict_by_feat`` (dense heads, RoI bbox/mask
    heads) cast to float32, so post-processing (decoding, thresholds, NMS) sees float32 tensors
    as in fp32 inference (mmcv's CPU NMS rejects bf16 boxes). Weights stay float32 (autocast
    casts per op). fp32: nothing to do. ``channels_last`` overrides the layout choice
    (default: ``precision.channels_last``; the benchmark measures both). Calling it twice is a
    no-op; a model prepared for another precision raises.
    """
    done = getattr(model, _PREPARED_ATTR, None)
    if done is not None:
        if done != precision.name:
            raise RuntimeError(f'model already prepared for {done}; build a fresh model for '
                               f'{precision.name}')
        return model
    use_channels_last = precision.channels_last if channels_last is None else channels_last
    if use_channels_last:
        model.to(memory_format=torch.channels_last)
        backbone = getattr(model, 'backbone', None)
        if isinstance(backbone, nn.Module):
            backbone.register_forward_pre_hook(_to_channels_last)
    if precision.name != 'fp32':
        for m in model.modules():
            if callable(getattr(m, 'predict_by_feat', None)):
                m.register_forward_hook(_outputs_to_float)
    if precision.name != 'fp32' or use_channels_last:
        for m in model.modules():
            if _is_roi_extractor(m):
                m.register_forward_pre_hook(_roi_extractor_inputs)
    setattr(model, _PREPARED_ATTR, precision.name)
    return model


def log_precision_once(precision: Precision) -> None:
    """Log ``precision.summary()`` through mmengine's current logger, once per process."""
    from mmengine.logging import print_log
    line = precision.summary()
    if line not in _logged:
        _logged.add(line)
        print_log(line, logger='current')
