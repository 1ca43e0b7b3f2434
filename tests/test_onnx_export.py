"""ONNX export in deploy mode (issue 9): onnxruntime vs PyTorch, dynamic sizes, post-processing,
and the command-line tools end to end.

Models are EfficientViT-M0 RetinaNets with narrow (64-channel) neck and head, randomised
(every weight, bias and BatchNorm statistic non-trivial) so a wrong fold, a baked-in padding or a
wrong output order fails. The randomisation keeps the network well conditioned (BatchNorm
statistics calibrated on data, residual branches and query scales moderate): a fully random
EfficientViT is numerically chaotic (float32 vs float64 of the *same* PyTorch model differ by
up to 100% at stage 3, because attention logits grow along the cascade), which would hide the
exporter's accuracy behind rounding noise.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close_rel
from torch import nn

from efficientvit_det.apis import init_detector
from efficientvit_det.deploy import (
    build_bbox_head,
    deploy_model,
    export_onnx,
    make_session,
    postprocess,
    preprocess_images,
    read_metadata,
    run_session,
)
from efficientvit_det.deploy.onnx_export import DetectorRawOutputs
from efficientvit_det.testing import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EXPORT_HW = (224, 320)
OTHER_HW = (200, 300)  # a multiple of neither 7 nor 32 (stage maps 13x19, 7x10, 4x5)
REL_TOL = 1e-4


def make_cfg(resize_hw=EXPORT_HW, head_norm=None):
    """A small RetinaNet-M0 config (inline, so the test does not depend on configs/)."""
    from mmengine.config import Config
    head = dict(
        type='RetinaHead', num_classes=5, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0))
    if head_norm:
        head['norm_cfg'] = head_norm
    return Config(dict(
        default_scope='mmdet',
        custom_imports=dict(imports=['efficientvit_det'], allow_failed_imports=False),
        model=dict(
            type='RetinaNet',
            data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                                   pad_size_divisor=1),
            backbone=dict(type='EfficientViT', arch='m0', out_indices=(2, 3, 4)),
            neck=dict(type='EfficientViTFPN', in_channels=[64, 128, 192], out_channels=64,
                      start_level=0, num_outs=5, num_extra_trans_convs=1,
                      add_extra_convs='on_input'),
            bbox_head=head,
            test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                          nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)),
        test_dataloader=dict(dataset=dict(
            type='CocoDataset',
            pipeline=[dict(type='LoadImageFromFile'),
                      dict(type='Resize', scale=(resize_hw[1], resize_hw[0]), keep_ratio=True),
                      dict(type='PackDetInputs',
                           meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                      'scale_factor'))]))))


@torch.no_grad()
def randomize_well_conditioned_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BN statistics calibrated on a random batch (non-trivial means
    and variances), residual branches scaled to 0.1 and query scales to 0.3."""
    randomize_(model, seed)
    for name, p in model.named_parameters():
        if re.search(r'(pw2|proj\.1|dw0\.m|dw1\.m|res1\.0\.m|res2\.0\.m)\.bn\.(weight|bias)$', name):
            p.mul_(0.1)
        elif re.search(r'dws\.\d+\.bn\.(weight|bias)$', name):
            p.mul_(0.3)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives its exact statistics
        bn.train()
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(2, 3, 256, 320, generator=g)
    feats = model.extract_feat(x) if hasattr(model, 'extract_feat') else model(x)
    if hasattr(model, 'bbox_head'):
        model.bbox_head(feats)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def build_random_detector(cfg, seed=0):
    model = init_detector(cfg)
    return randomize_well_conditioned_(model, seed)


def raw_outputs(model, x):
    with torch.no_grad():
        return DetectorRawOutputs(model)(x)


def write_image(path, hw, seed):
    import cv2
    rng = np.random.default_rng(seed)
    # smooth random content (upsampled noise), so no two anchors see identical pixels
    small = rng.integers(0, 256, (hw[0] // 8 + 1, hw[1] // 8 + 1, 3), dtype=np.uint8)
    img = cv2.resize(small, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(path), img)
    return str(path)


def match_detections(got, expected, what, box_atol=1e-2, score_atol=1e-4):
    """One-to-one match of two InstanceData (label equal, box and score close)."""
    gb, gs, gl = got.bboxes.numpy(), got.scores.numpy(), got.labels.numpy()
    eb, es, el = (expected.bboxes.numpy(), expected.scores.numpy(), expected.labels.numpy())
    assert len(gb) == len(eb), f'{what}: {len(gb)} detections, PyTorch gives {len(eb)}'
    assert len(eb) > 0, f'{what}: no detections to compare (test would be vacuous)'
    used = np.zeros(len(eb), bool)
    for b, s, lab in zip(gb, gs, gl):
        ok = (~used) & (el == lab) & (np.abs(eb - b).max(1) <= box_atol) & (np.abs(es - s) <= score_atol)
        assert ok.any(), f'{what}: detection {b} {s:.5f} label {lab} has no PyTorch match'
        used[np.flatnonzero(ok)[0]] = True


# --------------------------------------------------------------------------------------------
# fixtures: one export of each kind per module (tracing is the slow part)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def detector_pair():
    """(reference PyTorch model as configured, deploy-mode copy)."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = make_cfg()
    model = build_random_detector(cfg, seed=0)
    deploy = deploy_model(copy.deepcopy(model))
    return cfg, model, deploy


@pytest.fixture(scope='module')
def detector_onnx(detector_pair, tmp_path_factory):
    _, _, deploy = detector_pair
    path = str(tmp_path_factory.mktemp('onnx') / 'retinanet_m0.onnx')
    result = export_onnx(deploy, path, shape=EXPORT_HW, verify_shapes=[EXPORT_HW, OTHER_HW])
    return path, result


@pytest.fixture(scope='module')
def backbone_onnx(detector_pair, tmp_path_factory):
    _, _, deploy = detector_pair
    path = str(tmp_path_factory.mktemp('onnx') / 'backbone_m0.onnx')
    return path, export_onnx(deploy, path, shape=EXPORT_HW, backbone_only=True, verify_shapes=())


# --------------------------------------------------------------------------------------------
# backbone
# --------------------------------------------------------------------------------------------
def test_backbone_export_matches_pytorch_at_other_sizes(detector_pair, backbone_onnx):
    _, model, _ = detector_pair
    path, result = backbone_onnx
    assert result.mode == 'backbone'
    assert result.output_names == ['feat_s16', 'feat_s32', 'feat_s64']
    onnx.checker.check_model(path, full_check=True)
    sess = make_session(path)
    g = torch.Generator().manual_seed(5)
    # export size, a non-multiple of 7 and 32, batch 2 at an odd size, and maps below 7x7
    for n, h, w in [(1, *EXPORT_HW), (1, *OTHER_HW), (2, 97, 131), (1, 40, 72)]:
        x = torch.randn(n, 3, h, w, generator=g)
        with torch.no_grad():
            expected = model.backbone(x)  # the unfused model as trained
        got = run_session(sess, x)
        for name, e in zip(result.output_names, expected):
            assert_close_rel(torch.from_numpy(got[name]), e, REL_TOL, f'{name} at {n}x{h}x{w}')


def test_backbone_graph_is_dynamic_and_bn_free(backbone_onnx):
    path, _ = backbone_onnx
    proto = onnx.load(path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ['batch', 3, 'height', 'width']
    ops = {n.op_type for n in proto.graph.node}
    assert 'BatchNormalization' not in ops
    assert 'Pad' in ops  # the window padding is in the graph, computed from the input shape
    assert read_metadata(path)['mode'] == 'backbone'


# --------------------------------------------------------------------------------------------
# detector
# --------------------------------------------------------------------------------------------
def test_deploy_model_is_exact_and_removes_every_bn(detector_pair):
    _, model, deploy = detector_pair
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    x = torch.randn(1, 3, *OTHER_HW, generator=torch.Generator().manual_seed(3))
    for e, a in zip(raw_outputs(model, x), raw_outputs(deploy, x)):
        assert_close_rel(a, e, 2e-5, 'fused vs unfused')


def test_deploy_model_folds_head_batchnorm():
    cfg = make_cfg(head_norm=dict(type='BN', requires_grad=True))
    model = build_random_detector(cfg, seed=1)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.bbox_head.modules())
    deploy = deploy_model(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    for e, a in zip(raw_outputs(model, x), raw_outputs(deploy, x)):
        assert_close_rel(a, e, 2e-5, 'head BN folded')


def test_detector_export_metadata_and_verification(detector_onnx):
    path, result = detector_onnx
    assert result.mode == 'detector'
    assert result.output_names == [f'cls_score_{i}' for i in range(5)] + \
        [f'bbox_pred_{i}' for i in range(5)]
    assert [v['shape'] for v in result.verification] == ['1x3x224x320', '1x3x200x300']
    assert all(v['max_rel_err'] <= REL_TOL for v in result.verification)
    meta = read_metadata(path)
    assert meta['mode'] == 'detector' and meta['num_levels'] == 5
    assert meta['output_names'] == result.output_names


@pytest.mark.parametrize('n,hw', [(1, EXPORT_HW), (1, OTHER_HW), (2, (150, 234))])
def test_detector_raw_outputs_match_pytorch(detector_pair, detector_onnx, n, hw):
    _, model, _ = detector_pair
    path, result = detector_onnx
    x = torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    expected = raw_outputs(model, x)  # the unfused model, as configured
    got = run_session(make_session(path), x)
    for name, e in zip(result.output_names, expected):
        assert_close_rel(torch.from_numpy(got[name]), e, REL_TOL, f'{name} at {n}x{hw}')


@pytest.mark.parametrize('hw', [EXPORT_HW, OTHER_HW])
def test_postprocessed_detections_equal_predict(detector_pair, detector_onnx, tmp_path, hw):
    cfg, model, _ = detector_pair
    path, _ = detector_onnx
    cfg = make_cfg(resize_hw=hw)
    # an image at half the network size: the resize (x2) and the rescale back are exercised
    img = write_image(tmp_path / 'img.png', (hw[0] // 2, hw[1] // 2), seed=hw[0])
    inputs, samples = preprocess_images(cfg, [img])
    assert tuple(inputs.shape[2:]) == hw
    import cv2
    from_array, _ = preprocess_images(cfg, [cv2.imread(img)])  # BGR arrays work the same
    assert torch.equal(from_array, inputs)
    metas = [s.metainfo for s in samples]
    with torch.no_grad():
        expected = model.predict(inputs, copy.deepcopy(samples), rescale=True)[0].pred_instances
    head = build_bbox_head(cfg)

    # the post-processing step itself is exactly mmdet's: same result on PyTorch's raw outputs
    torch_raw = raw_outputs(model, inputs)
    names = [f'cls_score_{i}' for i in range(5)] + [f'bbox_pred_{i}' for i in range(5)]
    same = postprocess(torch_raw, metas, head, output_names=names)[0]
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(getattr(same, key), getattr(expected, key)), key

    # onnxruntime + post-processing = PyTorch's predict
    got = postprocess(run_session(make_session(path), inputs), metas, head)[0]
    match_detections(got, expected, f'detections at {hw}')
    assert got.bboxes[:, 2].max() <= hw[1] // 2 + 1e-3  # rescaled to the original image


def test_postprocess_rejects_backbone_outputs():
    with pytest.raises(ValueError, match='cls_score'):
        postprocess({'feat_s16': np.zeros((1, 4, 2, 2), np.float32)}, [{}], nn.Identity())


def test_init_detector_is_strict_and_accepts_backbone_checkpoints(tmp_path):
    cfg = make_cfg()
    model = init_detector(cfg)
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith('bbox_head.')}
    torch.save({'state_dict': bad}, tmp_path / 'partial.pth')
    with pytest.raises(RuntimeError, match='bbox_head'):
        init_detector(cfg, str(tmp_path / 'partial.pth'))
    bb = randomize_(copy.deepcopy(model.backbone), seed=7).state_dict()
    torch.save(bb, tmp_path / 'backbone.pth')
    loaded = init_detector(cfg, str(tmp_path / 'backbone.pth'))
    for k, v in bb.items():
        assert torch.equal(loaded.backbone.state_dict()[k], v), k


# --------------------------------------------------------------------------------------------
# command-line tools, end to end in subprocesses
# --------------------------------------------------------------------------------------------
def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([PY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_export_and_onnx_infer_end_to_end(detector_pair, tmp_path):
    _, model, _ = detector_pair
    cfg = make_cfg(resize_hw=OTHER_HW)
    cfg_file = str(tmp_path / 'retinanet_m0_small.py')
    cfg.dump(cfg_file)
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'meta': {'dataset_meta': {'classes': ['a', 'b', 'c', 'd', 'e']}},
                'state_dict': model.state_dict()}, ckpt)
    out = str(tmp_path / 'model.onnx')

    proc = _run(['tools/export_onnx.py', cfg_file, ckpt, '--out', out, '--shape', '224', '320',
                 '--json', str(tmp_path / 'export.json')])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the export size and a second one, a multiple of neither 7 nor 32
    assert 'verified at 1x3x224x320' in proc.stdout and 'verified at 1x3x171x243' in proc.stdout
    summary = json.load(open(tmp_path / 'export.json'))
    assert len(summary['verification']) == 2
    assert all(v['max_rel_err'] <= REL_TOL for v in summary['verification'])
    onnx.checker.check_model(out, full_check=True)
    assert read_metadata(out)['classes'] == ['a', 'b', 'c', 'd', 'e']

    img = write_image(tmp_path / 'img.png', (150, 225), seed=11)
    dets_file = str(tmp_path / 'dets.json')
    proc = _run(['tools/onnx_infer.py', cfg_file, out, img, '--out', dets_file,
                 '--score-thr', '0.05'])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = json.load(open(dets_file))[0]
    assert (entry['height'], entry['width']) == (150, 225)

    inputs, samples = preprocess_images(cfg, [img])
    with torch.no_grad():
        expected = model.predict(inputs, samples, rescale=True)[0].pred_instances
    keep = expected.scores >= 0.05
    assert len(entry['detections']) == int(keep.sum()) > 0
    for det in entry['detections']:
        assert det['class'] == 'abcde'[det['label']]
        d = (expected.bboxes - torch.tensor(det['bbox'])).abs().max(1).values
        ok = (d <= 0.02) & (expected.labels == det['label']) & \
            ((expected.scores - det['score']).abs() <= 1e-3)
        assert ok.any(), det


def test_cli_export_backbone_only_random_weights(tmp_path):
    cfg_file = str(tmp_path / 'cfg.py')
    make_cfg().dump(cfg_file)
    out = str(tmp_path / 'bb.onnx')
    proc = _run(['tools/export_onnx.py', cfg_file, 'none', '--out', out, '--backbone-only',
                 '--shape', '96', '128', '--opset', '16', '--verify-shape', '61', '89'])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'random weights' in proc.stderr and 'verified at 1x3x61x89' in proc.stdout
    proto = onnx.load(out)
    assert [o.name for o in proto.graph.output] == ['feat_s16', 'feat_s32', 'feat_s64']
    assert any(o.domain in ('', 'ai.onnx') and o.version == 16 for o in proto.opset_import)

    proc = _run(['tools/export_onnx.py', cfg_file, str(tmp_path / 'missing.pth'), '--out', out])
    assert proc.returncode == 2 and 'not found' in proc.stderr

