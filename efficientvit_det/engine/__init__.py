"""Training-time robustness: NaN/inf stop, skipped-image counts, mid-epoch exact resume."""
from .hooks import (NonFiniteLossError, NonFiniteLossHook, SkippedImagesHook,
                    find_robust_loaders)
from .loops import ResumableEpochBasedTrainLoop

__all__ = ['NonFiniteLossError', 'NonFiniteLossHook', 'SkippedImagesHook',
           'find_robust_loaders', 'ResumableEpochBasedTrainLoop']
