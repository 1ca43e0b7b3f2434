"""Mixed-precision training (``tools/train.py --amp``) on CUDA and on CPUs.

mmengine's ``AmpOptimWrapper`` runs on GPUs (and NPU/MLU/MUSA) only: on a CPU it stops with an
``AssertionError``. :class:`CpuAmpOptimWrapper` is the CPU form: the forward (and so the loss)
under ``torch.autocast('cpu', dtype=torch.bfloat16)``, the parameters and the optimizer state in
float32 (the master weights: autocast casts copies per op), and no loss scaling (bfloat16 has
float32's exponent range, so gradients do not underflow).

:func:`configure_amp` is what ``--amp`` does to a config: CUDA -> ``AmpOptimWrapper`` with a dynamic
loss scale (float16, as mmdet's tools do); a CPU that computes bfloat16 natively (AMX-BF16 or
AVX512-BF16, :func:`efficientvit_det.cpu.cpu_info`) -> :class:`CpuAmpOptimWrapper`; any other CPU
-> a one-line :class:`~efficientvit_det.cli.UserInputError` (oneDNN would emulate bf16, slower than
float32), unless ``EVIT_AMP_CPU_BF16=1`` forces the emulated path (correct but slow: for tests).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from efficientvit_det.cli import UserInputError
from efficientvit_det.cpu import CpuInfo, cpu_info

__all__ = ['CpuAmpOptimWrapper', 'configure_amp', 'FORCE_CPU_BF16_ENV']

FORCE_CPU_BF16_ENV = 'EVIT_AMP_CPU_BF16'
_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


@OPTIM_WRAPPERS.register_module()
class CpuAmpOptimWrapper(OptimWrapper):
    """:class:`mmengine.optim.OptimWrapper` whose ``optim_context`` (the model's data
    preprocessing, forward and loss in ``train_step``) runs under CPU autocast.

    Args:
        dtype: ``'bfloat16'`` (default; no loss scaling needed). ``'float16'`` is accepted for
            tests only: without a loss scale small gradients may underflow.
        **kwargs: those of :class:`~mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs):
        super().__init__(**kwargs)
        self.cast_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if self.cast_dtype not in _DTYPES.values():
            raise ValueError(f'CpuAmpOptimWrapper: dtype must be one of {sorted(_DTYPES)}, '
                             f'got {dtype!r}')

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield


def configure_amp(cfg, cuda: Optional[bool] = None, cpu: Optional[CpuInfo] = None) -> str:
    """Switch ``cfg.optim_wrapper`` to mixed precision for this machine (``--amp``); returns
    one line saying what it chose. Raises :class:`UserInputError` on a CPU without native
    bfloat16 unless ``EVIT_AMP_CPU_BF16=1``."""
    wrapper = cfg.optim_wrapper
    if cuda if cuda is not None else torch.cuda.is_available():
        if wrapper.get('type') != 'AmpOptimWrapper':
            wrapper.type = 'AmpOptimWrapper'
            wrapper.loss_scale = 'dynamic'
        return 'mixed precision: float16 autocast on CUDA (AmpOptimWrapper, dynamic loss scale)'
    info = cpu if cpu is not None else cpu_info()
    forced = os.environ.get(FORCE_CPU_BF16_ENV, '0') == '1'
    if not (info.native_bf16 or forced):
        raise UserInputError(
            f'--amp on a CPU trains under bfloat16 autocast, and this CPU ({info.name}) has '
            f'{info.bf16_instructions()}: bf16 would be emulated, slower than float32. Train '
            f'without --amp, or set {FORCE_CPU_BF16_ENV}=1 to run the emulated bf16 path anyway '
            '(correct but slow)')
    wrapper.type = 'CpuAmpOptimWrapper'
    wrapper.pop('loss_scale', None)
    wrapper.dtype = 'bfloat16'
    how = 'native' if info.native_bf16 else f'emulated ({FORCE_CPU_BF16_ENV}=1)'
    return (f'mixed precision: bfloat16 autocast on the CPU, {how}; float32 master weights, '
            'no loss scaling (CpuAmpOptimWrapper)')
