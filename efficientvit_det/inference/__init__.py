"""Inference: the form every inference path runs (deploy mode + precision).

* :func:`prepare_inference` (:mod:`.form`): a built detector into its inference form, in place;
* :mod:`.precision`: ``auto`` | ``fp32`` | ``bf16`` resolved for a device and applied to a model.
"""
from .form import model_precision, prepare_inference
from .precision import PRECISIONS, Precision, resolve_precision

__all__ = ['PRECISIONS', 'Precision', 'model_precision', 'prepare_inference', 'resolve_precision']
