"""EfficientViT (MSRA, CVPR 2023) for MMDetection 3.x.

Importing the package installs the compatibility layer (mmengine checkpoints load under
torch >= 2.6 with ``weights_only=True``) and registers the modules in mmdet's registries.
"""
from .compat import install as _install_compat

_install_compat()

# registers EfficientViT, EfficientViTFPN, the robust image loader, SafeCocoDataset, the
# NaN/inf and skipped-image hooks and the resumable epoch loop in mmdet's registries
from . import engine, models  # noqa: E402,F401
from .datasets import coco_checks, robust_loading  # noqa: E402,F401

__version__ = '0.1.0'
