"""Inference: the form every inference path runs (deploy mode + precision).

* :func:`prepare_inference` (:mod:`.form`): a built detector into its inference form, in place;
* :mod:`.precision`: ``auto`` | ``fp32`` | ``bf16`` resolved for a device and applied to a model;
* :mod:`.evaluate` (imported on its own): COCO evaluation of the PyTorch model and exported
  graphs side by side on the config's test data (``tools/test_onnx.py``).
"""
from .form import model_precision, prepare_inference
from .precision import PRECISIONS, Precision, resolve_precision

__all__ = ['PRECISIONS', 'Precision', 'model_precision', 'prepare_inference', 'resolve_precision']
