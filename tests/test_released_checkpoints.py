"""The original code's released detector checkpoints (mmdet 2.x) load exactly into our configs.

Files shaped like ``retinanet_efficientvit_m4_fpn_1x_coco.pth`` and
``mask_rcnn_efficientvit_m4_fpn_1x_coco.pth`` (docs/model_zoo.md) are built from our own
randomised detectors by renaming their state dicts to the original's names: the backbone in
the MSRA layout with its persistent ``attention_bias_idxs`` buffers, the neck's transposed-conv
levels as ``extra_trans_convs`` / ``extra_fpn_convs``, mmdet 2 meta (``CLASSES``, config text)
and an optimizer entry. They must load through every path users take with no missing or
unexpected key and give the source model's features and head outputs; the neck's renaming is
also checked against an independent re-implementation of the original neck's forward that
reads the original names.
"""
import itertools
import logging
import os.path as osp
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from mmengine.runner import load_checkpoint
from mmengine.structures import InstanceData

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, ROOT, TOOLS, make_dataset, run  # noqa: E402
from helpers import timm_to_msra  # noqa: E402

from efficientvit_det.apis import init_detector, load_config  # noqa: E402
from efficientvit_det.checkpoint import backbone as ckpt_lib  # noqa: E402
from efficientvit_det.checkpoint.detector import convert_detector_checkpoint  # noqa: E402
from efficientvit_det.testing import calibrate_bn_, max_rel_err, randomize_  # noqa: E402

CONFIGS = {
    'retinanet': osp.join(ROOT, 'configs', 'retinanet_efficientvit_m4_coco.py'),
    'mask_rcnn': osp.join(ROOT, 'configs', 'mask_rcnn_efficientvit_m4_coco.py'),
}
SIZES = [(256, 320), (250, 333)]  # the second is not a multiple of 32
TOL = 1e-5


def _coco_classes():
    from mmdet.datasets import CocoDataset
    return tuple(CocoDataset.METAINFO['classes'])


COCO_CLASSES = _coco_classes()
# faster predictions for the inferencer checks; no weight depends on these
FAST_TEST_CFG = {
    'retinanet': {'model.test_cfg.nms_pre': 200},
    'mask_rcnn': {'model.test_cfg.rpn.max_per_img': 100, 'model.test_cfg.rcnn.max_per_img': 10},
}


# --------------------------------------------------------------------------------------------
# the original's layout, written independently of the library's conversion
# --------------------------------------------------------------------------------------------
def original_bias_idxs(resolution: int = 7) -> torch.Tensor:
    """The original CascadedGroupAttention's buffer, computed as it does."""
    points = list(itertools.product(range(resolution), range(resolution)))
    offsets, idxs = {}, []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.LongTensor(idxs).view(len(points), len(points))


def to_original_state_dict(state_dict, num_trans):
    """Our detector state dict renamed to the original's: MSRA backbone + bias index buffers,
    ``extra_trans_convs.{j}.conv`` and ``extra_fpn_convs.{i}`` (finest first) in the neck."""
    out = {}
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    for key, value in timm_to_msra(backbone).items():
        out['backbone.' + key] = value
        if key.endswith('.attention_biases'):
            out['backbone.' + key[:-len('attention_biases')] + 'attention_bias_idxs'] = \
                original_bias_idxs()
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            continue
        m = re.match(r'neck\.trans_convs\.(\d+)\.(weight|bias)$', key)
        if m:
            key = f'neck.extra_trans_convs.{m.group(1)}.conv.{m.group(2)}'
        m = re.match(r'neck\.trans_fpn_convs\.(\d+)\.(.*)$', key)
        if m:
            key = f'neck.extra_fpn_convs.{num_trans - 1 - int(m.group(1))}.{m.group(2)}'
        out[key] = value
    return out


def original_neck_forward(sd, inputs, num_trans, extra_on_input):
    """The original EfficientViTFPN's forward (no norm, no activation), from its own names."""
    def conv(x, name, stride=1, padding=0):
        return F.conv2d(x, sd[f'neck.{name}.conv.weight'], sd[f'neck.{name}.conv.bias'],
                        stride=stride, padding=padding)

    laterals = [conv(x, f'lateral_convs.{i}') for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(
            laterals[i], size=laterals[i - 1].shape[2:], mode='nearest')
    extra_laterals, prev = [], laterals[0]
    for i in range(num_trans):
        prev = F.conv_transpose2d(prev, sd[f'neck.extra_trans_convs.{i}.conv.weight'],
                                  sd[f'neck.extra_trans_convs.{i}.conv.bias'], stride=2)
        extra_laterals.insert(0, prev)
    outs = [conv(lat, f'fpn_convs.{i}', padding=1) for i, lat in enumerate(laterals)]
    if extra_on_input:
        outs.append(conv(inputs[-1], f'fpn_convs.{len(laterals)}', stride=2, padding=1))
    extra_outs = [conv(x, f'extra_fpn_convs.{i}', padding=1) for i, x in enumerate(extra_laterals)]
    return extra_outs + outs


def fake_optimizer_state(model):
    """An optimizer entry as mmdet 2 saved it (AdamW state after one step)."""
    params = [p for p in model.parameters()][:3]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt.state_dict()


# --------------------------------------------------------------------------------------------
# fixtures: a randomised source detector per kind and its file in the original layout
# --------------------------------------------------------------------------------------------
def build_detector(kind):
    from mmdet.registry import MODELS
    cfg = load_config(CONFIGS[kind])
    cfg.model.backbone.init_cfg = None
    return cfg, MODELS.build(cfg.model)


@pytest.fixture(scope='module', params=['retinanet', 'mask_rcnn'])
def released(request, tmp_path_factory):
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    kind = request.param
    cfg, source = build_detector(kind)
    randomize_(source, seed=1)
    x = torch.randn(2, 3, *SIZES[0], generator=torch.Generator().manual_seed(0))
    calibrate_bn_(source, lambda: source.extract_feat(x))  # O(1) maps, as trained weights
    num_trans = cfg.model.neck.num_extra_trans_convs
    state = to_original_state_dict(source.state_dict(), num_trans)
    path = tmp_path_factory.mktemp(kind) / f'{kind}_efficientvit_m4_fpn_1x_coco.pth'
    torch.save({'meta': {'mmdet_version': '2.11.0', 'mmcv_version': '1.3.1',
                         'CLASSES': COCO_CLASSES, 'config': 'model = dict(type="X")\n',
                         'epoch': 12, 'iter': 87960, 'time': 'Tue Jun  6 12:00:00 2023'},
                'state_dict': state, 'optimizer': fake_optimizer_state(source)}, path)
    return dict(kind=kind, cfg=cfg, source=source, path=str(path), state=state,
                num_trans=num_trans)


def features_and_heads(model, x, kind):
    """Backbone maps, neck maps and raw head outputs for a batch of images ``x``."""
    with torch.no_grad():
        backbone = model.backbone(x)
        neck = model.neck(backbone)
        if kind == 'retinanet':
            cls, reg = model.bbox_head(neck)
            return list(backbone), list(neck), list(cls) + list(reg)
        cls, reg = model.rpn_head(neck)
        h, w = x.shape[2:]
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 8
        proposals = [InstanceData(bboxes=torch.cat([xy, xy + wh], 1)) for _ in range(len(x))]
        roi = model.roi_head(neck, proposals)  # (cls_score, bbox_pred, mask_preds)
        return list(backbone), list(neck), list(cls) + list(reg) + list(roi)


def assert_same_outputs(model, source, kind, what):
    errs = []
    for size in SIZES:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        got, expected = features_and_heads(model, x, kind), features_and_heads(source, x, kind)
        for part, a, e in zip(('backbone', 'neck', 'heads'), got, expected):
            err = max_rel_err(a, e)
            errs.append(err)
            assert err <= TOL, f'{kind} {what} {size} {part}: max rel err {err:.3g}'
    print(f'{kind} via {what}: max rel err {max(errs):.3g} over sizes {SIZES}')


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_file_has_the_original_layout(released):
    """The fixture really builds the original's names (guards the tests below)."""
    state = released['state']
    assert 'backbone.patch_embed.0.c.weight' in state
    assert 'backbone.blocks1.0.mixer.m.attn.attention_bias_idxs' in state
    assert state['backbone.blocks1.0.mixer.m.attn.attention_biases'].shape == (4, 49)
    assert 'neck.extra_trans_convs.0.conv.weight' in state
    assert state['neck.extra_trans_convs.0.conv.weight'].shape == (256, 256, 2, 2)
    assert not any(k.startswith(('backbone.stages', 'neck.trans_')) for k in state)
    if released['kind'] == 'retinanet':
        assert state['neck.fpn_convs.3.conv.weight'].shape == (256, 384, 3, 3)  # stride 128
        assert 'bbox_head.retina_cls.weight' in state
    else:
        assert 'neck.extra_fpn_convs.1.conv.weight' in state
        assert {'rpn_head.rpn_conv.weight', 'roi_head.bbox_head.shared_fcs.1.weight',
                'roi_head.mask_head.conv_logits.weight'} <= set(state)


def test_load_checkpoint_is_exact_and_logs_the_conversion_once(released, log):
    _, model = build_detector(released['kind'])
    ckpt = load_checkpoint(model, released['path'], map_location='cpu', strict=True)
    assert ckpt['meta']['CLASSES'] == COCO_CLASSES
    source = released['source'].state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == source.keys()
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key
    text = log.text(logging.INFO)
    assert len(re.findall(r'backbone: converted \d+ keys of the original \(MSRA\)', text)) == 1
    assert 'dropped 6 attention_bias_idxs buffers' in text
    n_neck = 4 * released['num_trans']  # weight + bias of a transposed conv and its 3x3 conv
    assert f'neck: converted {n_neck} keys of the original EfficientViTFPN' in text
    assert_same_outputs(model.eval(), released['source'].eval(), released['kind'],
                        'load_checkpoint')


def test_neck_mapping_matches_the_original_neck_forward(released):
    """Independent oracle: the original neck computed from the file's own (original) names."""
    _, model = build_detector(released['kind'])
    load_checkpoint(model, released['path'], map_location='cpu', strict=True)
    model.eval()
    extra_on_input = released['kind'] == 'retinanet'
    for size in SIZES:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            inputs = model.backbone(x)
            got = model.neck(inputs)
            expected = original_neck_forward(released['state'], inputs, released['num_trans'],
                                             extra_on_input)
        assert len(got) == len(expected) == 5
        err = max_rel_err(list(got), expected)
        print(f'{released["kind"]} {size}: neck vs the original forward, max rel err {err:.3g}')
        assert err <= TOL, f'{size}: neck vs the original forward, max rel err {err:.3g}'


def test_inferencer_and_init_detector_load_it(released, tmp_path):
    """DetInferencer(weights=...) and our init_detector: exact weights, the checkpoint's
    class names (mmdet 2 ``CLASSES`` -> ``dataset_meta``), detections on an image."""
    import numpy as np
    from mmdet.apis import DetInferencer

    kind = released['kind']
    cfg = load_config(CONFIGS[kind], FAST_TEST_CFG[kind])
    inferencer = DetInferencer(model=cfg, weights=released['path'], device='cpu',
                               show_progress=False)
    model = inferencer.model
    assert tuple(model.dataset_meta['classes']) == COCO_CLASSES
    assert_same_outputs(model, released['source'].eval(), kind, 'DetInferencer')
    img = np.random.default_rng(0).integers(0, 255, (250, 333, 3), dtype=np.uint8)
    pred = inferencer(img, pred_score_thr=0.0)['predictions'][0]
    assert len(pred['bboxes']) > 0 and len(pred['scores']) == len(pred['bboxes'])
    if kind == 'mask_rcnn':
        assert len(pred['masks']) == len(pred['bboxes'])

    ours = init_detector(cfg, released['path'], device='cpu')
    assert tuple(ours.dataset_meta['classes']) == COCO_CLASSES
    for key, value in ours.state_dict().items():
        assert torch.equal(value, released['source'].state_dict()[key]), key


def test_module_prefix_and_mixed_layouts(released, tmp_path):
    """A DDP ``module.`` prefix is stripped by every loader; a file holding a key in both
    layouts is refused naming the key."""
    state = {'module.' + k: v for k, v in released['state'].items()}
    path = tmp_path / 'ddp.pth'
    torch.save({'state_dict': state, 'meta': {'CLASSES': COCO_CLASSES}}, path)
    _, model = build_detector(released['kind'])
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    key = 'backbone.stages.0.blocks.0.dw0.m.conv.weight'
    assert torch.equal(model.state_dict()[key], released['source'].state_dict()[key])

    mixed = dict(released['state'])
    mixed[key] = released['source'].state_dict()[key]  # ours next to its MSRA name
    torch.save({'state_dict': mixed}, tmp_path / 'mixed.pth')
    with pytest.raises(RuntimeError, match='mixed MSRA and timm layouts'):
        load_checkpoint(build_detector(released['kind'])[1], str(tmp_path / 'mixed.pth'),
                        map_location='cpu', strict=True)


def test_wrong_bias_index_is_refused(released, tmp_path):
    state = dict(released['state'])
    key = 'backbone.blocks1.0.mixer.m.attn.attention_bias_idxs'
    state[key] = state[key].flip(0)
    torch.save({'state_dict': state}, tmp_path / 'bad.pth')
    with pytest.raises(RuntimeError, match='another attention geometry'):
        load_checkpoint(build_detector(released['kind'])[1], str(tmp_path / 'bad.pth'),
                        map_location='cpu', strict=True)
    with pytest.raises(ckpt_lib.CheckpointLayoutError, match='another attention geometry'):
        convert_detector_checkpoint({'state_dict': state})


def test_convert_tool_rewrites_a_detector_checkpoint(released, tmp_path):
    """tools/convert_checkpoint.py: our layout for good, CLASSES -> dataset_meta, no optimizer,
    checked against the config; the result loads with no conversion left to do."""
    import efficientvit_det  # noqa: F401  (allow-lists mmengine's checkpoint types)

    out = tmp_path / 'converted.pth'
    r = run([PY, osp.join(TOOLS, 'convert_checkpoint.py'), released['path'], out,
             '--config', CONFIGS[released['kind']]])
    assert 'attention_bias_idxs buffers dropped' in r.stdout and 'loads strictly' in r.stdout
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'state_dict', 'meta'}
    assert tuple(ckpt['meta']['dataset_meta']['classes']) == COCO_CLASSES
    assert ckpt['meta']['source_meta']['mmdet_version'] == '2.11.0'
    source = released['source'].state_dict()
    assert ckpt['state_dict'].keys() == source.keys()
    for key, value in ckpt['state_dict'].items():
        assert torch.equal(value, source[key]), key
    again = run([PY, osp.join(TOOLS, 'convert_checkpoint.py'), released['path'], out],
                check=False)
    assert again.returncode == 2 and 'exists' in again.stderr


@pytest.fixture(scope='module')
def coco_like(tmp_path_factory):
    """4 synthetic validation images (boxes + masks) under COCO's 80 category names, so the
    COCO configs evaluate them unchanged."""
    import json

    from mmdet.datasets import CocoDataset

    root = tmp_path_factory.mktemp('coco_like')
    make_dataset(root, num_train=0, num_val=4, size=128, seed=3)
    ann_file = root / 'annotations' / 'instances_val.json'
    with open(ann_file) as f:
        coco = json.load(f)
    coco['categories'] = [dict(id=i + 1, name=n) for i, n in
                          enumerate(CocoDataset.METAINFO['classes'])]
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return str(root) + '/'


def _coco_like_options(root):
    return ['--cfg-options', f'test_dataloader.dataset.data_root={root}',
            'test_dataloader.dataset.ann_file=annotations/instances_val.json',
            'test_dataloader.dataset.data_prefix.img=val/', 'test_dataloader.num_workers=0',
            'test_dataloader.persistent_workers=False',
            'test_dataloader.dataset.pipeline.1.scale=(256,256)',
            f'test_evaluator.ann_file={root}annotations/instances_val.json']


def test_evaluation_tools_load_it(released, coco_like, tmp_path):
    """RetinaNet through mmdet's own tools/test.py (from its wheel), Mask R-CNN through ours
    (bbox and segm AP printed): both are mmengine Runners with ``load_from``."""
    import mmdet
    if released['kind'] == 'retinanet':
        tool = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'test.py')
        if not osp.isfile(tool):
            pytest.skip(f'mmdet wheel without .mim/tools/test.py ({tool})')
        metrics = ['bbox']
    else:
        tool = osp.join(TOOLS, 'test.py')
        metrics = ['bbox', 'segm']
    r = run([PY, tool, CONFIGS[released['kind']], released['path'], '--work-dir',
             tmp_path / 'work', *_coco_like_options(coco_like)], cwd=str(tmp_path))
    text = r.stdout + r.stderr
    assert re.search(r'missing keys|unexpected key', text, re.I) is None, text[-3000:]
    assert 'backbone: converted' in text and 'neck: converted' in text
    for metric in metrics:
        assert re.search(rf'coco/{metric}_mAP: [\d.]+', text), text[-3000:]


def test_our_own_checkpoints_still_load(released, tmp_path):
    """Our layout (what this project's training writes) loads with no conversion logged."""
    path = tmp_path / 'ours.pth'
    torch.save({'state_dict': released['source'].state_dict(), 'meta': {}}, path)
    _, model = build_detector(released['kind'])
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, released['source'].state_dict()[key]), key
