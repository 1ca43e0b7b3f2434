"""Which files count as images when a folder is given (inference inputs, calibration sets)."""
from __future__ import annotations

import os
import os.path as osp
from typing import List

__all__ = ['IMG_EXTENSIONS', 'images_in_folder']

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def images_in_folder(folder: str) -> List[str]:
    """The image files directly in ``folder``, sorted by name (empty if there are none)."""
    return sorted(osp.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMG_EXTENSIONS))
