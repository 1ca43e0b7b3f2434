from .backbones import EfficientViT
from .necks import EfficientViTFPN
from .tta import DetTTAModelWithMasks

__all__ = ['EfficientViT', 'EfficientViTFPN', 'DetTTAModelWithMasks']
