"""Let mmengine checkpoints load under torch >= 2.6 with ``weights_only=True`` kept on.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, and the unpickler refuses the few non-tensor types a Runner
checkpoint holds (the message hub's ``HistoryBuffer``, numpy arrays and scalars,
``collections.Counter`` from MultiStepLR). We allow-list exactly those. ``HistoryBuffer``
pickles its statistics methods through ``builtins.getattr``; allow-listing the real
``getattr`` would let a file reach any attribute of any allowed object, so a restricted
getattr stands in for it (``add_safe_globals`` accepts a ``(callable, name)`` pair).
"""
from __future__ import annotations

import collections
from typing import Any, List

import numpy as np
import torch

# HistoryBuffer's built-in statistics; the class registry fills only on first instantiation.
_HISTORY_BUFFER_STATISTICS = frozenset({'min', 'max', 'current', 'mean'})


def _restricted_getattr(obj: Any, name: str) -> Any:
    """``getattr`` limited to HistoryBuffer's statistics methods."""
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = _HISTORY_BUFFER_STATISTICS | set(HistoryBuffer._statistics_methods)
    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) and name in allowed \
            and not name.startswith('_'):
        return getattr(obj, name)
    raise torch.serialization.pickle.UnpicklingError(
        f'checkpoint asks for attribute {name!r} of {type(obj).__name__}: refused, only '
        'mmengine HistoryBuffer statistics methods may be looked up (weights_only=True)')


def _numpy_globals() -> List[Any]:
    """numpy types that arrays and scalars in a checkpoint are rebuilt from."""
    try:  # numpy >= 1.25 moved these; both names resolve to the same objects
        from numpy.core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover
        from numpy._core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in
                     ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                      'uint64', 'float16', 'float32', 'float64')]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def safe_globals() -> List[Any]:
    """Everything this package adds to torch's weights-only allow-list."""
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, collections.Counter, collections.OrderedDict,
            (_restricted_getattr, 'builtins.getattr'), *_numpy_globals()]


def install() -> None:
    """Register the allow-list with torch (idempotent; no-op on torch without the API)."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 has no weights-only allow-list and loads these anyway
        return
    add(safe_globals())
