"""Fused operators of efficientvit_det.

``cascaded_group_attention``: the windowed cascaded group attention block of EfficientViT in one
op, registered as ``torch.ops.efficientvit_det.cga``, with ``reference`` (PyTorch), ``cpu`` (C++
extension) and ``triton`` (GPU) backends and autograd through all of them; ``BACKENDS`` is the
one vocabulary for choosing among them, from a config's ``attn_backend`` down to the op.
``available_backends(device)`` lists what can run here. The plain PyTorch oracle is
:func:`efficientvit_det.ops.cga_reference.cga_reference`.
"""
from .cga import (
                  BACKENDS,
                  available_backends,
                  cascaded_group_attention,
                  check_backend,
                  cpu_extension_status,
                  resolve_backend,
)

__all__ = ['BACKENDS', 'available_backends', 'cascaded_group_attention', 'check_backend',
           'cpu_extension_status', 'resolve_backend']
