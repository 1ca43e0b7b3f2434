"""Oracles and helpers shared by the tests and the benchmarks (as ``torch.testing`` is).

* :func:`randomize_` / :func:`calibrate_bn_`: non-trivial weights and BatchNorm statistics,
  so that comparing two implementations means something (zero-initialised branches would hide
  errors);
* :func:`max_rel_err`: the comparison every check uses (error relative to the output scale);
* :func:`timm_window_attention` / :func:`fold_timm_attention`: timm's ``LocalWindowAttention``
  as an independent oracle of the fused op, and its weights in the op's layout;
* :func:`saved_tensor_bytes`: what autograd keeps for backward.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch
from torch import Tensor, nn

from efficientvit_det.models.backbones.efficientvit import fold_bn

__all__ = ['randomize_', 'calibrate_bn_', 'max_rel_err', 'timm_window_attention',
           'fold_timm_attention', 'saved_tensor_bytes']


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, branch_scale: float = 0.1) -> nn.Module:
    """Give every parameter and BN statistic non-trivial values, in place.

    Norm weights that are all zero before this call (the zero-initialised last BN of residual
    branches) get ``branch_scale`` times the usual random weight: with full-size branches a
    random deep residual net is chaotic (float32 rounding alone moves its stage-3 output by
    percents), whereas trained networks keep those branches small.
    """
    g = torch.Generator().manual_seed(seed)
    zero_init = {name for name, p in model.named_parameters()
                 if name.endswith('weight') and p.dim() == 1 and not p.any()}
    for name, p in model.named_parameters():
        if name.endswith('attention_biases'):
            p.copy_(torch.randn(p.shape, generator=g).to(p))
        elif p.dim() > 1:
            p.copy_((torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5).to(p))
        elif name.endswith('weight'):
            scale = branch_scale if name in zero_init else 1.
            p.copy_(((torch.rand(p.shape, generator=g) + 0.5) * scale).to(p))
        else:
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(
                (torch.randn(m.running_mean.shape, generator=g) * 0.1).to(m.running_mean))
            m.running_var.copy_(
                (torch.rand(m.running_var.shape, generator=g) + 0.5).to(m.running_var))
    return model


@torch.no_grad()
def calibrate_bn_(model: nn.Module, forward: Callable[[], Any]) -> nn.Module:
    """Set every BatchNorm's running statistics to those of one ``forward()`` batch.

    Random BN statistics let activations grow by orders of magnitude through the residual
    stages, where float32 itself is no longer reproducible and an equal-output check means
    nothing; calibrated statistics keep the maps O(1), as trained weights do. Leaves the model
    in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly this batch's statistics
        m.train()
    try:
        forward()
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return model.eval()


def max_rel_err(actual, expected) -> float:
    """max |a - e| / max |e| over a tensor or a sequence of tensors (the worst entry)."""
    if isinstance(actual, Tensor):
        actual, expected = [actual], [expected]
    worst = 0.
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return float('inf')
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        worst = max(worst, (a - e).abs().max().item() / max(e.abs().max().item(), 1e-12))
    return worst


def timm_window_attention(dim: int, num_heads: int = 4, kernels: Sequence[int] = (7, 5, 3, 3),
                          key_dim: int = 16, window_size: int = 7, seed: int = 0) -> nn.Module:
    """timm's ``LocalWindowAttention`` with randomised weights and BN statistics, eval mode.

    ``resolution`` is set large so the window stays ``window_size`` for any input: the original
    detection code's behaviour (pad + partition unless the map is exactly one window).
    """
    from timm.models.efficientvit_msra import LocalWindowAttention
    mod = LocalWindowAttention(dim, key_dim, num_heads=num_heads,
                               attn_ratio=(dim // num_heads) / key_dim, resolution=1 << 16,
                               window_resolution=window_size, kernels=tuple(kernels))
    return randomize_(mod, seed).eval()


def _fold_conv_norm(conv_norm: nn.Module):
    return fold_bn(conv_norm.conv.weight, None, conv_norm.bn)


def fold_timm_attention(module: nn.Module) -> Dict[str, Tensor]:
    """The fused op's weight arguments from a timm ``LocalWindowAttention`` (BN folded), packed
    by the op's own :func:`efficientvit_det.ops.pack_cga_weights`."""
    from efficientvit_det.ops import pack_cga_weights
    attn = module.attn
    return pack_cga_weights([_fold_conv_norm(m) for m in attn.qkvs],
                            [_fold_conv_norm(m) for m in attn.dws], attn.attention_biases,
                            _fold_conv_norm(attn.proj[1]))


def saved_tensor_bytes(call: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> int:
    """Bytes autograd saves for backward while ``call()`` runs, each storage counted once and
    the storages of ``exclude`` (inputs, weights: they exist anyway) not at all."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return total
