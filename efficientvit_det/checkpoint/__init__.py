"""Checkpoints: the one safe loader and the key layouts of backbone, neck and detector.

* :mod:`.safe_load`: ``load_checkpoint_file`` (``weights_only=True`` + a narrow allow-list),
  ``install`` (the allow-list, and this loader as mmengine's loader of local files, so every
  path reads checkpoints the same way);
* :mod:`.backbone`: MSRA / timm classification layouts, the original's detector backbone keys,
  ``load_pretrained`` (a backbone's ``init_cfg``);
* :mod:`.neck`: the original EfficientViTFPN's key names;
* :mod:`.detector`: ``load_detector_checkpoint`` and the conversion of whole released files.
"""
from .safe_load import UnsafeCheckpointError, install, load_checkpoint_file

__all__ = ['UnsafeCheckpointError', 'install', 'load_checkpoint_file']
