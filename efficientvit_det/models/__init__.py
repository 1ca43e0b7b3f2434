# registers the fused attention op's FLOP handles with mmengine's complexity analysis
from . import complexity  # noqa: F401
from .backbones import EfficientViT
from .necks import EfficientViTFPN
from .tta import DetTTAModelWithMasks

__all__ = ['EfficientViT', 'EfficientViTFPN', 'DetTTAModelWithMasks']
