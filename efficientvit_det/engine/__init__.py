"""Training-time robustness: NaN/inf stop, skipped-image counts, mid-epoch exact resume; deploy
mode and inference precision in the test loop (``InferenceOptimizationHook``); mixed-precision
training on CPUs and GPUs (``CpuAmpOptimWrapper``, ``configure_amp``)."""
from .amp import CpuAmpOptimWrapper, configure_amp
from .hooks import NonFiniteLossError, NonFiniteLossHook, SkippedImagesHook, find_robust_loaders
from .inference_hook import InferenceOptimizationHook
from .loops import ResumableEpochBasedTrainLoop
from .visualization import EfficientViTDetVisualizer

__all__ = ['CpuAmpOptimWrapper', 'configure_amp', 'InferenceOptimizationHook',
           'NonFiniteLossError', 'NonFiniteLossHook', 'SkippedImagesHook', 'find_robust_loaders',
           'ResumableEpochBasedTrainLoop', 'EfficientViTDetVisualizer']
