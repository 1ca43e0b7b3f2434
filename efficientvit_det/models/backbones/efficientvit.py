"""EfficientViT (MSRA, CVPR 2023) backbone for detection.

Module names follow timm's ``efficientvit_msra`` so timm checkpoints load as they are;
MSRA (original) checkpoints are remapped by :func:`checkpoint_filter_fn`.

Semantics follow the original detection code: every stage uses 7x7 windows, feature
maps are always zero-padded bottom/right to a multiple of the window (padded tokens
are not masked), windows are attended independently and the result is cropped.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import Tensor, nn

from efficientvit_det.archs import LEVEL_STRIDES, LEVELS, resolve_arch
from efficientvit_det.ops import cascaded_group_attention, check_attn_backend, pack_cga_weights, plan_attention
from efficientvit_det.ops.windows import relative_position_index, window_partition, window_reverse
from efficientvit_det.registry import MODELS


def fold_bn(weight: Tensor, bias: Optional[Tensor],
            bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """Weight and bias of the conv that equals ``bn(conv(x))`` with the BN's running statistics.

    The one place BatchNorm folding is written (backbone ``fuse()``, the fused op's weights,
    deploy mode of whole detectors). Differentiable, so gradients reach the conv and BN.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


class ConvNorm(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d; ``fold()`` gives the equivalent conv weight/bias."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, bn_weight_init: float = 1.):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def fold(self) -> Tuple[Tensor, Tensor]:
        """Differentiable BN folding (valid while the BN uses running statistics)."""
        return fold_bn(self.conv.weight, None, self.bn)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        weight, bias = self.fold()
        c = self.conv
        fused = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                          groups=c.groups, bias=True, device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        return fused


@functools.lru_cache(maxsize=None)
def _onednn_conv_pointwise():
    """oneDNN's fused conv + pointwise op of CPU torch builds, or None (looked up on first use:
    a private op, so a torch build without it must still import this module)."""
    try:
        return torch.ops.mkldnn._convolution_pointwise if torch.backends.mkldnn.is_available() \
            else None
    except (AttributeError, RuntimeError):
        return None


class ConvReLU(nn.Module):
    """``relu(conv(x))`` for inference (made by :meth:`EfficientViT.fuse`).

    On CPU float32 without autograd it is one oneDNN call: the ReLU is applied as the conv
    writes its output, which saves a full pass over the map (measured 20-25% of such a pair on
    2 cores). Elsewhere (GPU, autograd, tracing / ONNX export) it runs the two plain ops.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def _can_fuse(self, x: Tensor) -> bool:
        c = self.conv
        return (x.device.type == 'cpu' and x.dtype == torch.float32
                and c.weight.dtype == torch.float32 and c.padding_mode == 'zeros'
                and not isinstance(c.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad))
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and not torch.onnx.is_in_onnx_export()
                and _onednn_conv_pointwise() is not None)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        if self._can_fuse(x):
            return _onednn_conv_pointwise()(x, c.weight, c.bias, c.padding, c.stride, c.dilation,
                                            c.groups, 'relu', [], '')
        return torch.relu(c(x))


def conv_weight_bias(module: nn.Module) -> Tuple[Tensor, Tensor]:
    """Weight and bias of a ConvNorm (folded) or of an already fused Conv2d."""
    if isinstance(module, ConvNorm):
        return module.fold()
    return module.weight, module.bias


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> Tensor:
        return x + self.m(x)


class ConvMlp(nn.Module):
    """The FFN: 1x1 expand, ReLU, 1x1 back (its BN starts at zero)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden_dim)
        self.act = nn.ReLU()
        self.pw2 = ConvNorm(hidden_dim, dim, bn_weight_init=0.)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, rd_ratio: float = 0.25):
        super().__init__()
        rd_channels = max(8, int(channels * rd_ratio + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid_dim = dim * 4
        self.conv1 = ConvNorm(dim, hid_dim)
        self.act1 = nn.ReLU()
        self.conv2 = ConvNorm(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.act2 = nn.ReLU()
        self.se = SqueezeExcite(hid_dim, .25)
        self.conv3 = ConvNorm(hid_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


def dw_residual(dim: int, bn_weight_init: float = 1.) -> Residual:
    return Residual(ConvNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init))


def ffn_residual(dim: int) -> Residual:
    return Residual(ConvMlp(dim, dim * 2))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over one window per batch item (the original's module).

    Args:
        dim: channels in and out.
        key_dim: query/key channels per head.
        num_heads: heads; head i sees channel chunk i plus head i-1's output.
        window_size: side of the (square) window the input must have.
        kernels: q depthwise kernel size per head.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int,
                 kernels: Sequence[int]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads
        self.scale = key_dim ** -0.5
        self.window_size = window_size
        self.kernels = tuple(kernels[:num_heads])
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, key_dim * 2 + self.val_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, k, 1, k // 2, groups=key_dim) for k in self.kernels)
        self.proj = nn.Sequential(nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim, bn_weight_init=0.))
        n = window_size * window_size
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n))
        self.register_buffer('attention_bias_idxs', relative_position_index(window_size),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if (h, w) != (self.window_size, self.window_size):
            raise ValueError(f'CascadedGroupAttention expects {self.window_size}x{self.window_size} '
                             f'windows, got {h}x{w}')
        biases = self.attention_biases[:, self.attention_bias_idxs]
        chunks = x.chunk(self.num_heads, dim=1)
        outs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = outs[-1] + chunks[i]
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases[i]
            attn = attn.softmax(dim=-1)
            outs.append((v @ attn.transpose(-2, -1)).view(b, self.val_dim, h, w))
        return self.proj(torch.cat(outs, 1))

    def fused_params(self) -> Dict[str, Tensor]:
        """Folded weights in the layout of :func:`efficientvit_det.ops.cascaded_group_attention`.

        Built from differentiable ops, so gradients reach the conv and BN parameters.
        """
        return pack_cga_weights([conv_weight_bias(m) for m in self.qkvs],
                                [conv_weight_bias(m) for m in self.dws], self.attention_biases,
                                conv_weight_bias(self.proj[1]))


class LocalWindowAttention(nn.Module):
    """Windowed cascaded group attention on a full feature map of any size.

    Args:
        attn_backend: one of :data:`efficientvit_det.ops.ATTN_BACKENDS`. ``module`` runs the
            original's module path (pad, partition, attend, reverse: plain PyTorch with the
            unfolded Conv+BN); ``reference`` is its deprecated old name. The others call the
            fused op with this backend on BN-folded weights, which is exact only with eval-mode
            attention BatchNorms: while they train, ``auto`` runs the module path and the
            explicit backends raise. :func:`efficientvit_det.ops.plan_attention` decides, once
            per forward.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int = 7,
                 kernels: Sequence[int] = (5, 5, 5, 5), attn_backend: str = 'auto'):
        super().__init__()
        self.attn_backend = attn_backend
        self.window_size = window_size
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, window_size, kernels)

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        self._attn_backend = check_attn_backend(value)  # the one check of the name

    def _bn_in_training(self) -> bool:
        return any(m.training for m in self.attn.modules() if isinstance(m, nn.BatchNorm2d))

    def forward(self, x: Tensor) -> Tensor:
        plan = plan_attention(self.attn_backend, x, bn_training=self._bn_in_training())
        if plan.kernel != 'module':
            return cascaded_group_attention(x, **self.attn.fused_params(), key_dim=self.attn.key_dim,
                                            window_size=self.window_size, scale=self.attn.scale,
                                            backend=plan)
        windows, grid = window_partition(x, self.window_size)
        return window_reverse(self.attn(windows), grid, x.shape[2:])


class EfficientVitBlock(nn.Module):
    """The sandwich: dw -> FFN -> windowed attention -> dw -> FFN, each residual."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int,
                 kernels: Sequence[int], attn_backend: str):
        super().__init__()
        self.dw0 = dw_residual(dim, bn_weight_init=0.)
        self.ffn0 = ffn_residual(dim)
        self.mixer = Residual(LocalWindowAttention(dim, key_dim, num_heads, window_size, kernels,
                                                  attn_backend))
        self.dw1 = dw_residual(dim, bn_weight_init=0.)
        self.ffn1 = ffn_residual(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class EfficientVitDownsample(nn.Sequential):
    """Between stages: residual dw + FFN, PatchMerging (stride 2), residual dw + FFN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.res1 = nn.Sequential(dw_residual(in_dim), ffn_residual(in_dim))
        self.patchmerge = PatchMerging(in_dim, out_dim)
        self.res2 = nn.Sequential(dw_residual(out_dim), ffn_residual(out_dim))


class EfficientVitStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, key_dim: int, num_heads: int,
                 window_size: int, kernels: Sequence[int], downsample: bool, attn_backend: str,
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.downsample = EfficientVitDownsample(in_dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            EfficientVitBlock(out_dim, key_dim, num_heads, window_size, kernels, attn_backend)
            for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for m in itertools.chain([self.downsample], self.blocks):
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(m, x, use_reentrant=False)
            else:
                x = m(x)
        return x


class PatchEmbedding(nn.Module):
    """Four 3x3 stride-2 ConvNorms (stride 16); also returns the stride-4 and -8 maps.

    ``num_outputs`` (1-3): the maps built and returned, [stride 4, stride 8, stride 16];
    a backbone that stops at a stem level builds no conv after it.
    """

    def __init__(self, in_chans: int, dim: int, num_outputs: int = 3):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, 2, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, 2, 1)
        self.relu2 = nn.ReLU()
        if num_outputs >= 2:
            self.conv3 = ConvNorm(dim // 4, dim // 2, 3, 2, 1)
            self.relu3 = nn.ReLU()
        if num_outputs >= 3:
            self.conv4 = ConvNorm(dim // 2, dim, 3, 2, 1)
        self.num_outputs = num_outputs

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        maps = [self.relu2(self.conv2(self.relu1(self.conv1(x))))]
        if self.num_outputs >= 2:
            maps.append(self.relu3(self.conv3(maps[-1])))
        if self.num_outputs >= 3:
            maps.append(self.conv4(maps[-1]))
        return tuple(maps)


@MODELS.register_module()
class EfficientViT(BaseModule):
    """EfficientViT backbone (MSRA) returning a tuple of feature maps.

    Args:
        arch: 'm0'..'m5' or a dict with ``embed_dims``, ``depths``, ``num_heads``,
            ``kernels`` (and optionally ``key_dim``, ``window_size``).
        out_indices: levels to return, from ``LEVELS``: 0 = stem stride 4 (C1/4 channels),
            1 = stem stride 8 (C1/2), 2/3/4 = stages 1/2/3 (strides 16/32/64). Nothing after
            the last requested level is built, run or trained (e.g. ``(1, 2, 3)`` has no
            stage 3, so DDP needs no ``find_unused_parameters``); a checkpoint's tensors of
            those parts are ignored when it loads, with one log line.
        frozen_stages: -1 freezes nothing; 0 the stem; k >= 1 the stem and stages 1..k.
        norm_eval: keep every BatchNorm in eval mode while training (as the original).
        with_cp: activation checkpointing per block (saves memory, costs a recompute).
        attn_backend: the attention backend, one of :data:`efficientvit_det.ops.ATTN_BACKENDS`
            (default ``auto``), see :class:`LocalWindowAttention`; change it later with
            :meth:`set_attn_backend`. ``attn_impl`` is its deprecated old name.
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint=PATH)``; MSRA and timm
            classification checkpoints are both accepted.
    """

    def __init__(self, arch: Union[str, dict] = 'm4', out_indices: Sequence[int] = (2, 3, 4),
                 frozen_stages: int = -1, norm_eval: bool = True, with_cp: bool = False,
                 attn_backend: str = 'auto', in_channels: int = 3, init_cfg: Optional[dict] = None,
                 attn_impl: Optional[str] = None):
        super().__init__(init_cfg=init_cfg)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.arch = resolve_arch(arch)
        dims, depths = self.arch['embed_dims'], self.arch['depths']
        heads, kernels = self.arch['num_heads'], self.arch['kernels']
        key_dim = self.arch.get('key_dim', 16)
        window_size = self.arch.get('window_size', 7)
        if max(heads) > len(kernels):
            raise ValueError(f'arch needs one q kernel per head: {len(kernels)} kernels for {max(heads)} heads')
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < len(LEVELS) for i in out_indices) \
                or len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices must be distinct values in 0..{len(LEVELS) - 1} '
                             f'(levels {dict(enumerate(LEVELS))}), got {out_indices}')
        if not -1 <= frozen_stages <= 3:
            raise ValueError(f'frozen_stages must be in -1..3, got {frozen_stages}')
        if attn_impl is not None:
            warnings.warn("EfficientViT(attn_impl=...) is deprecated: use attn_backend "
                          "(same values, plus 'cpu'/'triton')", DeprecationWarning, stacklevel=2)
            attn_backend = attn_impl
        attn_backend = check_attn_backend(attn_backend)
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.attn_backend = attn_backend
        self.window_size = window_size

        # levels 0..num_levels-1 are computed: the stem's maps up to the last requested
        # level, then the stages up to it
        self.num_levels = max(out_indices) + 1
        self.patch_embed = PatchEmbedding(in_channels, dims[0], num_outputs=min(self.num_levels, 3))
        self.stages = nn.ModuleList()
        in_dim = dims[0]
        for i in range(max(self.num_levels - 2, 0)):
            self.stages.append(EfficientVitStage(
                in_dim, dims[i], depths[i], key_dim, heads[i], window_size, kernels,
                downsample=i > 0, attn_backend=attn_backend, with_cp=with_cp))
            in_dim = dims[i]
        level_channels = (dims[0] // 4, dims[0] // 2, *dims)
        self.out_channels: List[int] = [level_channels[i] for i in out_indices]
        self.out_strides: List[int] = [LEVEL_STRIDES[i] for i in out_indices]
        self._freeze_stages()

    def unbuilt_prefixes(self) -> Tuple[str, ...]:
        """State-dict prefixes of the full backbone's parts that ``out_indices`` leaves out
        (timm/our layout), e.g. ``('stages.2.',)`` for ``out_indices=(2, 3)``."""
        stem = ('patch_embed.conv3.', 'patch_embed.conv4.')[max(self.num_levels - 1, 0):]
        return stem + tuple(f'stages.{i}.' for i in range(len(self.stages), 3))

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        maps = self.patch_embed(x)
        levels = list(maps[:2])
        if self.stages:
            x = maps[2]
            for stage in self.stages:
                x = stage(x)
                levels.append(x)
        return tuple(levels[i] for i in self.out_indices)

    def set_attn_backend(self, backend: str) -> 'EfficientViT':
        """Switch every attention block to ``backend`` (one of ``ops.ATTN_BACKENDS``); returns self."""
        self.attn_backend = backend = check_attn_backend(backend)
        for m in self.modules():
            if isinstance(m, LocalWindowAttention):
                m.attn_backend = backend
        return self

    def _freeze_stages(self) -> None:
        frozen = ([self.patch_embed] if self.frozen_stages >= 0 else []) + \
            list(self.stages[:max(self.frozen_stages, 0)])
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'EfficientViT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            from efficientvit_det.checkpoint.backbone import load_pretrained
            load_pretrained(self, self.init_cfg['checkpoint'],
                            prefix=self.init_cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the original's detector checkpoints hold the backbone in the MSRA layout: renamed
        # before the keys are matched, as torch modules load older state layouts
        from efficientvit_det.checkpoint.backbone import load_msra_keys_hook
        load_msra_keys_hook(self, state_dict, prefix, error_msgs)
        self._drop_unbuilt_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _drop_unbuilt_keys(self, state_dict: Dict[str, Tensor], prefix: str) -> None:
        """Remove (in place) the tensors of parts this backbone does not build, with one log
        line: a full checkpoint (classification, released detector, ours) loads into a
        backbone that stops early, strictly too."""
        unbuilt = self.unbuilt_prefixes()
        dropped = [k for k in state_dict
                   if k.startswith(prefix) and k[len(prefix):].startswith(unbuilt)] if unbuilt else []
        if not dropped:
            return
        for k in dropped:
            del state_dict[k]
        parts = [p.rstrip('.') for p in unbuilt if any(k.startswith(prefix + p) for k in dropped)]
        print_log(f'{prefix.rstrip(".") or "backbone"}: out_indices={self.out_indices} ends at '
                  f'level {LEVELS[self.num_levels - 1]!r}: ignored {len(dropped)} checkpoint '
                  f'tensors of the parts not built ({", ".join(parts)})', logger='current')

    @torch.no_grad()
    def fuse(self) -> 'EfficientViT':
        """Fold every Conv+BN into a single conv, in place, for inference; then merge each
        conv that feeds a ReLU with it (:class:`ConvReLU`)."""
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ConvNorm):
                    setattr(parent, name, child.fuse())
        for parent, conv, relu in _CONV_RELU_PAIRS:
            for m in self.modules():
                if isinstance(m, parent) and isinstance(getattr(m, conv, None), nn.Conv2d):
                    setattr(m, conv, ConvReLU(getattr(m, conv)))
                    setattr(m, relu, nn.Identity())
        return self


# (module type, conv attribute, the ReLU attribute applied right after it in forward)
_CONV_RELU_PAIRS = ((PatchEmbedding, 'conv1', 'relu1'), (PatchEmbedding, 'conv2', 'relu2'),
                    (PatchEmbedding, 'conv3', 'relu3'), (ConvMlp, 'pw1', 'act'),
                    (PatchMerging, 'conv1', 'act1'), (PatchMerging, 'conv2', 'act2'),
                    (SqueezeExcite, 'fc1', 'act'))
