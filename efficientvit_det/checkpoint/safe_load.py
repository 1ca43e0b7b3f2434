"""The one way checkpoints are read: ``torch.load(..., weights_only=True)`` plus a narrow
allow-list, so mmengine Runner checkpoints load under torch >= 2.6 with the check kept on.

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
import os
import pickle
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


def install_safe_globals() -> None:
    """Register the allow-list with torch (idempotent; no-op on torch without the API)."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 has no weights-only allow-list and loads these anyway
        return
    add(safe_globals())


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle asks for objects outside the weights-only allow-list (an
    ``UnpicklingError``, as ``torch.load`` raises, so callers that catch that still do)."""


def load_checkpoint_file(path: str, map_location: str = 'cpu') -> Any:
    """Read a checkpoint with ``weights_only=True`` and the allow-list (local path or any
    mmengine URI); an unsafe pickle raises :class:`UnsafeCheckpointError` naming the file."""
    if not os.path.isfile(path) and '://' not in path:
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    install_safe_globals()
    try:
        if os.path.isfile(path):
            return torch.load(path, map_location=map_location, weights_only=True)
        from mmengine.runner.checkpoint import CheckpointLoader  # torch.load: weights_only default
        return CheckpointLoader.load_checkpoint(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines()
                       if 'Unsupported' in line or 'refused' in line), str(e).splitlines()[0])
        raise UnsafeCheckpointError(
            f'refused to load {path}: its pickle asks for objects outside the weights-only '
            f'allow-list, which could run code on this machine ({reason.strip()}). Re-save the '
            'weights as a plain state dict from a trusted environment.') from None


def _mmengine_local_loader(filename: str, map_location=None) -> Any:
    return load_checkpoint_file(os.path.expanduser(filename), map_location=map_location or 'cpu')


def install() -> None:
    """Make :func:`load_checkpoint_file` the loader of every path, once per process.

    Registers the allow-list, and this loader as mmengine's loader of local files, so
    mmengine's own paths (a Runner's ``load_from`` / resume, ``load_checkpoint``, mmdet's
    ``DetInferencer``, a backbone's ``init_cfg``) read files the same way and refuse unsafe
    pickles with the same message. Called on ``import efficientvit_det``.
    """
    install_safe_globals()
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=_mmengine_local_loader, force=True)
