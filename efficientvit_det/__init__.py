"""EfficientViT (MSRA, CVPR 2023) for MMDetection 3.x.

Importing the package installs the compatibility layer (mmengine checkpoints load under
torch >= 2.6 with ``weights_only=True``) and registers the modules in mmdet's registries.
"""
from .compat import install as _install_compat

_install_compat()

from . import models  # noqa: E402,F401  (registers EfficientViT, EfficientViTFPN)

__version__ = '0.1.0'
