"""EfficientViT backbone: fidelity to timm / the original, checkpoints, training switches."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, timm_stage_outputs, timm_to_msra

from efficientvit_det.archs import ARCH_SETTINGS
from efficientvit_det.checkpoint.backbone import CheckpointLayoutError
from efficientvit_det.models.backbones.efficientvit import (
    ConvReLU,
    EfficientViT,
    LocalWindowAttention,
    _onednn_conv_pointwise,
)
from efficientvit_det.ops.windows import relative_position_index
from efficientvit_det.registry import MODELS
from efficientvit_det.testing import randomize_

ARCHS = sorted(ARCH_SETTINGS)
TOL = 1e-5


def timm_model(arch: str, img_size: int, seed: int = 0):
    return randomize_(timm.create_model(f'efficientvit_{arch}', img_size=img_size), seed).eval()


def build_from_checkpoint(arch: str, path, **kwargs) -> EfficientViT:
    backbone = MODELS.build(dict(type='EfficientViT', arch=arch, attn_backend='module',
                                 init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs))
    backbone.init_weights()
    return backbone.eval()


@pytest.fixture(scope='module')
def timm448():
    """Randomised timm models at 448 px (7x7 windows in every stage, as the original)."""
    return {arch: timm_model(arch, 448, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('layout', ['timm', 'msra'])
def test_matches_timm_at_448_and_896(arch, layout, timm448, tmp_path):
    ref = timm448[arch]
    sd = ref.state_dict()
    if layout == 'msra':  # wrapped and named like the original, with its extra keys
        sd = timm_to_msra(sd)
        sd.update({'blocks1.0.mixer.m.attn.attention_bias_idxs': relative_position_index(7)})
        ckpt = {'model': {f'module.{k}': v for k, v in sd.items()}}
    else:
        ckpt = sd
    torch.save(ckpt, tmp_path / 'ckpt.pth')
    ours = build_from_checkpoint(arch, tmp_path / 'ckpt.pth')
    torch.manual_seed(1)
    for size in (448, 896):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            expected = timm_stage_outputs(ref, x)
            got = ours(x)
        for i, (a, e) in enumerate(zip(got, expected)):
            assert_close_rel(a, e, TOL, f'{arch} {layout} {size}px stage {i + 1}')


@pytest.mark.parametrize('arch', ['m0', 'm4', 'm5'])
def test_224_checkpoint_resizes_stage3_bias_and_pads_like_the_original(arch, tmp_path):
    """A 224-px checkpoint has a 4x4 stage-3 bias table; detection pads to 7x7 windows."""
    src = timm_model(arch, 224)
    table = src.stages[2].blocks[0].mixer.m.attn.attention_biases.detach()
    assert table.shape[1] == 16
    torch.save(timm_to_msra(src.state_dict()), tmp_path / 'msra224.pth')
    ours = build_from_checkpoint(arch, tmp_path / 'msra224.pth')
    resized = F.interpolate(table.view(1, -1, 4, 4), size=(7, 7), mode='bicubic',
                            align_corners=False).view(-1, 49)
    torch.testing.assert_close(ours.stages[2].blocks[0].mixer.m.attn.attention_biases.detach(), resized)

    # Oracle for the padded semantics: timm built for 7x7 windows, same (resized) weights.
    oracle = timm.create_model(f'efficientvit_{arch}', img_size=448).eval()
    result = oracle.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith('head.') for k in result.missing_keys)
    for shape in [(224, 224), (200, 330), (97, 61)]:
        x = torch.randn(2, 3, *shape)
        with torch.no_grad():
            got, expected = ours(x), timm_stage_outputs(oracle, x)
            first_two = timm_stage_outputs(src, x)[:2] if shape == (224, 224) else expected[:2]
        for i in range(3):
            assert_close_rel(got[i], expected[i], TOL, f'{arch} {shape} stage {i + 1}')
        for i in range(2):  # stages 1-2 equal timm at 224 itself
            assert_close_rel(got[i], first_two[i], TOL, f'{arch} {shape} stage {i + 1} vs timm-224')


@pytest.mark.parametrize('shape', [(1, 1), (20, 20), (33, 17), (112, 112), (64, 250)])
def test_any_input_size(shape):
    model = randomize_(EfficientViT('m0', out_indices=(0, 1, 2, 3, 4), attn_backend='module')).eval()
    x = torch.randn(2, 3, *shape)
    with torch.no_grad():
        outs = model(x)
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128, 192] == model.out_channels
    for o, stride in zip(outs, model.out_strides):
        expected = (shape[0], shape[1])
        for _ in range({4: 2, 8: 3, 16: 4, 32: 5, 64: 6}[stride]):
            expected = ((expected[0] - 1) // 2 + 1, (expected[1] - 1) // 2 + 1)
        assert o.shape == (2, o.shape[1], *expected)
        assert torch.isfinite(o).all()


def test_window_attention_is_per_window():
    """Changing one window's input changes no other window's output (windows are separate)."""
    lwa = randomize_(LocalWindowAttention(64, 16, 4, 7, (7, 5, 3, 3), attn_backend='module')).eval()
    x = torch.randn(1, 64, 14, 20)
    y = x.clone()
    y[:, :, :7, :7] += 1.0
    with torch.no_grad():
        a, b = lwa(x), lwa(y)
    assert not torch.allclose(a[:, :, :7, :7], b[:, :, :7, :7])
    torch.testing.assert_close(a[:, :, 7:], b[:, :, 7:])
    torch.testing.assert_close(a[:, :, :, 7:], b[:, :, :, 7:])


def test_fuse_keeps_outputs():
    # float64: a randomised net amplifies fp32 rounding chaotically (sharp softmaxes), which
    # would hide whether folding itself is exact.
    model = randomize_(EfficientViT('m4', attn_backend='module')).double().eval()
    x = torch.randn(1, 3, 200, 300, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.fuse()
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(after, before):
        assert_close_rel(a, b, 1e-9, 'fused')


@pytest.mark.parametrize('conv_args,channels_last', [
    ((16, 32, 3, 2, 1), True), ((16, 32, 3, 2, 1), False), ((64, 128, 1), True),
    (dict(in_channels=48, out_channels=48, kernel_size=3, stride=2, padding=1, groups=48), True)])
def test_conv_relu_equals_relu_of_conv(conv_args, channels_last):
    conv = (torch.nn.Conv2d(**conv_args) if isinstance(conv_args, dict)
            else torch.nn.Conv2d(*conv_args)).eval()
    x = torch.randn(2, conv.in_channels, 23, 37)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    fused = ConvReLU(conv)
    with torch.no_grad():
        assert fused._can_fuse(x) == (_onednn_conv_pointwise() is not None)  # the oneDNN path runs
        torch.testing.assert_close(fused(x), torch.relu(conv(x)), rtol=1e-5, atol=1e-6)
    # with autograd it runs the plain ops (the oneDNN op has no backward)
    xg = x.clone().requires_grad_()
    assert not fused._can_fuse(xg)
    fused(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_fuse_merges_every_conv_relu_pair():
    model = EfficientViT('m4', attn_backend='module').eval().fuse()
    # stem 3, every FFN (2 per block, 2 per downsample) 16, PatchMerging 2 x 2, SE fc1 2
    assert sum(isinstance(m, ConvReLU) for m in model.modules()) == 3 + 16 + 4 + 2
    assert not any(isinstance(m, torch.nn.ReLU) for name, m in model.named_modules()
                   if not name.endswith('attn.proj.0'))  # the attention's ReLU precedes its conv


def test_norm_eval_freezes_bn_statistics():
    model = randomize_(EfficientViT('m0', norm_eval=True, attn_backend='module'))
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    model(torch.randn(2, 3, 64, 64)).__getitem__(0).sum().backward()
    for k, v in model.state_dict().items():
        if 'running' in k:
            torch.testing.assert_close(v, stats[k], msg=k)
    # without norm_eval the statistics move
    model = randomize_(EfficientViT('m0', norm_eval=False, attn_backend='module')).train()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.patch_embed.conv1.bn.running_mean,
                           stats['patch_embed.conv1.bn.running_mean'])


@pytest.mark.parametrize('frozen', [0, 1, 2])
def test_frozen_stages_get_no_gradient(frozen):
    model = randomize_(EfficientViT('m0', frozen_stages=frozen, attn_backend='module')).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    frozen_mods = [model.patch_embed, *model.stages[:frozen]]
    for m in frozen_mods:
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    for m in model.stages[frozen:]:
        assert all(p.grad is not None for p in m.parameters())


def test_with_cp_gives_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 80)
    grads = []
    for with_cp in (False, True):
        model = randomize_(EfficientViT('m0', with_cp=with_cp, attn_backend='module')).train()
        inp = x.clone().requires_grad_()
        sum((o ** 2).mean() for o in model(inp)).backward()
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='m9'), 'unknown EfficientViT arch'),
    (dict(arch=dict(embed_dims=(1, 2, 3))), 'arch dict must have the fields'),
    (dict(out_indices=(2, 5)), 'out_indices'),
    (dict(frozen_stages=4), 'frozen_stages'),
    (dict(attn_backend='flash'), 'unknown attention backend'),
])
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientViT(**kwargs)


def test_wrong_arch_checkpoint_is_a_clear_error(tmp_path):
    torch.save(timm_model('m0', 224).state_dict(), tmp_path / 'm0.pth')
    with pytest.raises(CheckpointLayoutError, match=r'checkpoint has embed_dims \(64, 128, 192\)'):
        build_from_checkpoint('m4', tmp_path / 'm0.pth')


def test_unknown_layout_is_a_clear_error(tmp_path):
    torch.save({'state_dict': {'conv.weight': torch.zeros(1)}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointLayoutError, match='unknown checkpoint layout'):
        build_from_checkpoint('m4', tmp_path / 'other.pth')


def test_missing_and_unexpected_keys_are_reported_by_name(tmp_path):
    sd = timm_model('m0', 448).state_dict()
    sd.pop('stages.2.blocks.2.ffn1.m.pw2.bn.weight')
    sd['stages.2.blocks.9.extra.weight'] = torch.zeros(1)
    torch.save(sd, tmp_path / 'partial.pth')
    backbone = EfficientViT('m0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'partial.pth')))
    from efficientvit_det.checkpoint.backbone import load_pretrained
    missing, unexpected = load_pretrained(backbone, str(tmp_path / 'partial.pth'))
    assert missing == ['stages.2.blocks.2.ffn1.m.pw2.bn.weight']
    assert unexpected == ['stages.2.blocks.9.extra.weight']


def test_convert_checkpoint_tool(tmp_path):
    import os
    import subprocess
    import sys
    src = timm_model('m1', 224)
    ckpt = {'model': timm_to_msra(src.state_dict())}
    torch.save(ckpt, tmp_path / 'msra.pth')
    out = tmp_path / 'out' / 'backbone.pth'
    tool = os.path.join(os.path.dirname(__file__), '..', 'tools', 'convert_checkpoint.py')
    cmd = [sys.executable, tool, str(tmp_path / 'msra.pth'), str(out), '--arch', 'm1']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(out, weights_only=True)['state_dict']
    assert not any(k.startswith('head') for k in sd)
    assert sd['stages.2.blocks.0.mixer.m.attn.attention_biases'].shape == (3, 49)
    converted = build_from_checkpoint('m1', out)
    direct = build_from_checkpoint('m1', tmp_path / 'msra.pth')
    for k, v in direct.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, msg=k)
    again = subprocess.run(cmd, capture_output=True, text=True)  # refuses to overwrite
    assert again.returncode == 2 and 'exists' in again.stderr
