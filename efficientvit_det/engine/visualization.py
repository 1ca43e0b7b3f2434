"""``EfficientViTDetVisualizer``: mmdet's ``DetLocalVisualizer`` with the project's label style.

What it changes (the configs' ``visualizer`` uses it, so ``tools/infer.py``, ``tools/test.py
--show-dir`` and mmdet's own tools draw the same):

* scores read as everywhere else in the project: ``circle 0.85`` (0..1, two decimals, as in the
  demo's grid; ``detections.json`` keeps four), where mmdet writes ``circle: 84.6``;
* a label stays inside the picture: next to the right or bottom edge (small images, boxes that
  touch the border) it is moved left / up until it fits, where mmdet lets it run off the image.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import numpy as np
import torch
from mmdet.registry import VISUALIZERS
from mmdet.visualization import DetLocalVisualizer

__all__ = ['EfficientViTDetVisualizer', 'format_score']


def format_score(score: float) -> str:
    """How a score is shown in pictures: ``0.85``."""
    return f'{float(score):.2f}'


@functools.lru_cache(maxsize=None)
def _char_width(char: str) -> float:
    """Advance of ``char`` in matplotlib's sans-serif at 1 point (cached: measuring is slow)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    prop = FontProperties(family=['sans-serif'])
    # the width of 'x<char>x' minus that of 'xx': the advance, side bearings included
    pair = TextPath((0, 0), 'xx', size=100, prop=prop).get_extents().width
    return (TextPath((0, 0), f'x{char}x', size=100, prop=prop).get_extents().width - pair) / 100


def _text_size_px(text: str, font_size: float, dpi: float) -> tuple:
    """(width, height) in pixels of ``text`` drawn at ``font_size`` points, box padding included."""
    pad = 2 * 0.7 * font_size  # the label box's pad (fraction of the font size), both sides
    scale = dpi / 72.0
    width = sum(_char_width(c) for c in text) * font_size
    return (width + pad) * scale, (font_size * 1.2 + pad) * scale


@VISUALIZERS.register_module()
class EfficientViTDetVisualizer(DetLocalVisualizer):
    """``DetLocalVisualizer`` with ``class 0.85`` labels kept inside the image."""

    def _draw_instances(self, image: np.ndarray, instances, classes: Optional[List[str]],
                        palette: Optional[List[tuple]]) -> np.ndarray:
        if 'scores' in instances and 'bboxes' in instances and len(instances):
            instances = instances.clone()
            labels = [int(x) for x in instances.labels]
            names = list(instances.label_names) if 'label_names' in instances else [
                classes[label] if classes is not None and label < len(classes)
                else f'class {label}' for label in labels]
            instances.label_names = [f'{name} {format_score(s)}'
                                     for name, s in zip(names, instances.scores)]
            instances.pop('scores')  # mmdet would append ': 84.6'
        return super()._draw_instances(image, instances, classes, palette)

    def draw_texts(self, texts, positions, font_sizes=None, *args, **kwargs):
        if isinstance(texts, str) and font_sizes is not None and getattr(self, 'width', None):
            pos = positions.detach().cpu().numpy() if isinstance(positions, torch.Tensor) \
                else np.asarray(positions)
            pos = pos.astype(np.float64).reshape(2)
            w, h = _text_size_px(texts, float(font_sizes), self.dpi)
            pos[0] = min(max(pos[0], 0.0), max(self.width - w, 0.0))
            pos[1] = min(max(pos[1], 0.0), max(self.height - h, 0.0))
            positions = pos
        return super().draw_texts(texts, positions, font_sizes, *args, **kwargs)
