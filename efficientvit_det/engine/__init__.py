"""mmengine runner pieces: training-time robustness (NaN/inf stop, skipped-image counts,
mid-epoch exact resume), mixed precision on CPUs and GPUs (``CpuAmpOptimWrapper``,
``configure_amp``), deploy mode and precision in the test loop (``InferenceOptimizationHook``),
the progress line and the labelled-detections visualizer."""
from .amp import CpuAmpOptimWrapper, configure_amp
from .hooks import NonFiniteLossError, NonFiniteLossHook, SkippedImagesHook, find_robust_loaders
from .inference_hook import InferenceOptimizationHook
from .loops import ResumableEpochBasedTrainLoop
from .visualization import EfficientViTDetVisualizer

__all__ = ['CpuAmpOptimWrapper', 'configure_amp', 'InferenceOptimizationHook',
           'NonFiniteLossError', 'NonFiniteLossHook', 'SkippedImagesHook', 'find_robust_loaders',
           'ResumableEpochBasedTrainLoop', 'EfficientViTDetVisualizer']
