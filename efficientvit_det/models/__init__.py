from .backbones import EfficientViT
from .necks import EfficientViTFPN

__all__ = ['EfficientViT', 'EfficientViTFPN']
