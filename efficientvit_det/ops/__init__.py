"""Fused operators of efficientvit_det.

``cascaded_group_attention``: the windowed cascaded group attention block of EfficientViT in one
op, with ``reference`` (PyTorch), ``cpu`` (C++ extension) and ``triton`` (GPU) backends and
autograd through all of them. ``available_backends(device)`` lists what can run here. The plain
PyTorch oracle is ``efficientvit_det.ops.cga_reference.cga_reference``.
"""
from .cga import (BACKENDS, available_backends, cascaded_group_attention,  # noqa: F401
                  cpu_extension_status, resolve_backend)

__all__ = ['cascaded_group_attention', 'available_backends', 'cpu_extension_status',
           'resolve_backend', 'BACKENDS']
