"""EfficientViT (MSRA, CVPR 2023) for MMDetection 3.x.

Where MMDetection is installed, importing the package (as a config's ``custom_imports`` does)
registers the backbone, the neck, the dataset and engine pieces in mmdet's registries and
makes the project's weights-only checkpoint loader the one mmengine uses for local files.
Without mmdet only the parts that need torch alone import: the fused attention op
(``efficientvit_det.ops``) and the arch presets (``efficientvit_det.archs``), e.g. for timm's
``efficientvit_msra`` classifiers.
"""
__version__ = '0.1.0'


def _mmdet_installed() -> bool:
    try:
        import mmdet  # noqa: F401
    except ModuleNotFoundError as exc:
        # only a missing OpenMMLab package means "torch-only use"; a broken install must show
        if exc.name in ('mmdet', 'mmcv', 'mmengine'):
            return False
        raise
    return True


if _mmdet_installed():
    from .checkpoint import install as _install_checkpoint_loader

    # every checkpoint, through mmengine's loaders too, is read weights-only with our allow-list
    _install_checkpoint_loader()
    # registers EfficientViT, EfficientViTFPN, the robust image loader, SafeCocoDataset, the
    # NaN/inf and skipped-image hooks and the resumable epoch loop in mmdet's registries
    from . import engine, models  # noqa: E402,F401
    from .datasets import coco_checks, robust_loading  # noqa: E402,F401
