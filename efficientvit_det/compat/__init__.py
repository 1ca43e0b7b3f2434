"""Compatibility fixes for the torch 2.14 / mmcv 2.1 / mmengine 0.10.7 / mmdet 3.3 stack."""
from .checkpoint_safety import install as install_checkpoint_safety


def install() -> None:
    """Apply every fix; called once on ``import efficientvit_det``."""
    install_checkpoint_safety()
