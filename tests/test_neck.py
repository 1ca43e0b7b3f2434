"""EfficientViTFPN: output strides and channels for the RetinaNet and Mask R-CNN settings."""
from __future__ import annotations

import pytest
import torch

from efficientvit_det.registry import MODELS

M4 = [128, 256, 384]


def backbone_maps(batch=2, h=800, w=1344, channels=M4):
    sizes = []
    for _ in range(4):  # stride 16
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    for c in channels:
        sizes.append(torch.randn(batch, c, h, w))
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return tuple(sizes)


@pytest.mark.parametrize('trans, num_outs, extra, expected_strides', [
    (1, 5, 'on_input', [8, 16, 32, 64, 128]),     # RetinaNet m4
    (2, 5, False, [4, 8, 16, 32, 64]),            # Mask R-CNN m4
    (0, 4, 'on_input', [16, 32, 64, 128]),        # no trans conv (the original crashed here)
    (0, 5, False, [16, 32, 64, 128, 256]),        # max-pool extras
])
def test_output_strides_and_channels(trans, num_outs, extra, expected_strides):
    neck = MODELS.build(dict(type='EfficientViTFPN', in_channels=M4, out_channels=256, start_level=0,
                             num_outs=num_outs, num_extra_trans_convs=trans, add_extra_convs=extra))
    neck.init_weights()
    h, w = 512, 1024
    inputs = backbone_maps(h=h, w=w)
    outs = neck(inputs)
    assert len(outs) == num_outs
    for out, stride in zip(outs, expected_strides):
        assert out.shape[1] == 256
        assert (out.shape[2], out.shape[3]) == (h // stride, w // stride), (stride, out.shape)


def test_trans_conv_is_2x2_stride2_with_bias_and_gets_gradient():
    neck = MODELS.build(dict(type='EfficientViTFPN', in_channels=M4, out_channels=256, num_outs=5,
                             num_extra_trans_convs=1, add_extra_convs='on_input'))
    deconv = neck.trans_convs[0]
    assert deconv.kernel_size == (2, 2) and deconv.stride == (2, 2) and deconv.bias is not None
    outs = neck(backbone_maps(batch=1, h=320, w=320))
    outs[0].sum().backward()
    assert deconv.weight.grad is not None and deconv.weight.grad.abs().sum() > 0


def test_channel_mismatch_names_the_fix():
    neck = MODELS.build(dict(type='EfficientViTFPN', in_channels=[64, 128, 192], out_channels=64,
                             num_outs=5, num_extra_trans_convs=1, add_extra_convs='on_input'))
    with pytest.raises(ValueError, match=r'set neck.in_channels=\[128, 256, 384\]'):
        neck(backbone_maps(batch=1, h=320, w=320))


@pytest.mark.parametrize('trans', [0, 1, 2])
def test_upsample_scale_factor_equals_size_upsampling(trans):
    """mmdet's documented ``upsample_cfg=dict(scale_factor=2)`` works (maps that halve exactly:
    the same result as upsampling to the finer map's size)."""
    kwargs = dict(type='EfficientViTFPN', in_channels=M4, out_channels=32, num_outs=5,
                  num_extra_trans_convs=trans, add_extra_convs='on_input')
    by_size = MODELS.build(kwargs)
    by_factor = MODELS.build(dict(kwargs, upsample_cfg=dict(scale_factor=2, mode='nearest')))
    by_factor.load_state_dict(by_size.state_dict())
    inputs = backbone_maps(batch=1, h=512, w=1024)
    with torch.no_grad():
        expected, got = by_size(inputs), by_factor(inputs)
    assert len(got) == 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('extra, relu, start_level, upsample', [
    ('on_input', False, 0, {}),
    ('on_lateral', True, 0, {}),
    ('on_output', True, 1, {}),
    (False, False, 0, dict(scale_factor=2, mode='nearest')),
])
def test_fpn_levels_equal_mmdet_fpn(extra, relu, start_level, upsample):
    """Our FPN part (written out to reach the finest lateral without a stash) computes what
    mmdet's FPN computes, for every extra-level mode; the transposed-conv levels grow from the
    finest lateral after the top-down pass."""
    from mmdet.models.necks import FPN
    kwargs = dict(in_channels=M4, out_channels=32, num_outs=5, start_level=start_level,
                  add_extra_convs=extra, relu_before_extra_convs=relu,
                  upsample_cfg=dict(upsample or dict(mode='nearest')))
    ours = MODELS.build(dict(type='EfficientViTFPN', num_extra_trans_convs=1, **dict(
        kwargs, num_outs=6)))
    theirs = FPN(**kwargs)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()
                            if not k.startswith('trans_')})
    inputs = backbone_maps(batch=1, h=512, w=1024)
    with torch.no_grad():
        got, expected = ours(inputs), theirs(inputs)
        lateral = ours.lateral_convs[0](inputs[start_level])
        for i in range(len(ours.lateral_convs) - 1, 0, -1):  # the top-down pass, by hand
            lateral_i = ours.lateral_convs[i](inputs[i + start_level])
            for _ in range(i):
                lateral_i = torch.nn.functional.interpolate(lateral_i, scale_factor=2)
            lateral = lateral + lateral_i
        finest = ours.trans_fpn_convs[0](ours.trans_convs[0](lateral))
    assert len(got) == 6
    for a, b in zip(got[1:], expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got[0], finest, rtol=1e-4, atol=1e-4)
