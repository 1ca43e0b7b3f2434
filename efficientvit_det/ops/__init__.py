"""Fused operators of efficientvit_det (torch only: nothing here imports mmdet/mmcv/mmengine).

``cascaded_group_attention``: the windowed cascaded group attention block of EfficientViT in one
op, registered as ``torch.ops.efficientvit_det.cga``, with ``reference`` (PyTorch), ``cpu`` (C++
extension) and ``triton`` (GPU) backends and autograd through all of them. ``BACKENDS`` is the
op's vocabulary, ``ATTN_BACKENDS`` the backbone's (``module`` = its module path instead of
``reference``); ``plan_attention`` is the one decision of what runs (:mod:`.dispatch`), and the
fallback of ``auto`` lives inside the op (:mod:`.guard`). ``available_backends(device)`` lists
what can run here. The plain PyTorch oracle is
:func:`efficientvit_det.ops.cga_reference.cga_reference`.
"""
from .cga import cascaded_group_attention
from .dispatch import (
    ATTN_BACKENDS,
    BACKENDS,
    AttentionPlan,
    available_backends,
    check_attn_backend,
    check_backend,
    cpu_extension_status,
    plan_attention,
    resolve_backend,
)
from .weights import pack_cga_weights

__all__ = ['ATTN_BACKENDS', 'BACKENDS', 'AttentionPlan', 'available_backends',
           'cascaded_group_attention', 'check_attn_backend', 'check_backend',
           'cpu_extension_status', 'pack_cga_weights', 'plan_attention', 'resolve_backend']
