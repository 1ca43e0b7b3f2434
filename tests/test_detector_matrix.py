"""Every detector config of the project, and mmdet's own tools on them.

* the matrix: each ``configs/*.py`` builds, runs a training step on small synthetic images
  (finite losses; a gradient reaches every trainable parameter, the backbone's included: what
  DDP without ``find_unused_parameters`` needs), predicts, and its own data pipelines run on
  the synthetic dataset;
* the backbone computes only what ``out_indices`` asks for, and full checkpoints still load;
* the fused attention op is counted by mmengine's complexity analysis as its reference path,
  so FLOP counts do not depend on the attention backend; ``python -m benchmarks flops`` counts
  every config; mmdet's ``get_flops.py`` agrees with the project's count;
* mmdet's ``benchmark.py --task dataloader`` and ``tools/test.py`` run on the flagship.

All on CPU at 128 px (the synthetic dataset's size).
"""
import glob
import json
import os
import os.path as osp
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.structures import InstanceData

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import FLAGSHIP_CONFIG, PY, ROOT, make_dataset, run  # noqa: E402

from efficientvit_det.models.backbones.efficientvit import EfficientViT  # noqa: E402

CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
IDS = [osp.basename(c)[:-3] for c in CONFIGS]
MMDET_TOOLS = osp.join(osp.dirname(__import__('mmdet').__file__), '.mim', 'tools')
SIZE = 128
SYNTHETIC_CLASSES = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')


def test_the_matrix_covers_every_detector_family():
    families = {osp.basename(c).split('_efficientvit')[0] for c in CONFIGS}
    assert {'retinanet', 'mask_rcnn', 'fcos', 'atss', 'faster_rcnn', 'cascade_mask_rcnn', 'dino',
            'rtmdet'} <= families, families


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------
# --cfg-options for small CPU steps. DINO picks its 900 queries among the encoder's tokens, and
# a 128 px image has 16^2 + 8^2 + 4^2 + 2^2 = 340 (any backbone: mmdet's DINO-R50 too).
# The R-CNNs keep 1000-2000 proposals per image, whose box head (a 12.5M-MAC fc per RoI) is
# most of a CPU step: 100 are enough to exercise every part.
_FEW_PROPOSALS = {'model.train_cfg.rpn_proposal.max_per_img': 100,
                  'model.test_cfg.rpn.max_per_img': 100}
SMALL_IMAGE_OPTIONS = {'dino': {'model.num_queries': 100}, 'mask_rcnn': _FEW_PROPOSALS,
                       'faster_rcnn': _FEW_PROPOSALS, 'cascade_mask_rcnn': _FEW_PROPOSALS}


def build_detector(config):
    """The config's detector with random weights (no ImageNet checkpoint), CPU."""
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(_options(config))
    cfg.model.backbone.init_cfg = None
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    return cfg, model


def has_masks(cfg) -> bool:
    return cfg.model.get('roi_head', {}).get('mask_head') is not None


def synthetic_batch(with_masks: bool, num=2, size=SIZE, seed=0):
    """``num`` random images with 1-3 boxes each (and their box-shaped masks)."""
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(num):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
        k = 1 + i % 3
        xy = torch.randint(0, size // 2, (k, 2), generator=g).float()
        wh = torch.randint(16, size // 2, (k, 2), generator=g).float()
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        sample = DetDataSample(metainfo=dict(
            img_id=i, img_path=f'{i}.jpg', img_shape=(size, size), ori_shape=(size, size),
            scale_factor=(1.0, 1.0), flip=False, flip_direction=None))
        gt = InstanceData(bboxes=boxes, labels=torch.randint(0, 6, (k,), generator=g))
        if with_masks:
            masks = np.zeros((k, size, size), dtype=np.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            gt.masks = BitmapMasks(masks, size, size)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('config', CONFIGS, ids=IDS)
def test_config_trains_a_step_and_predicts(config):
    cfg, model = build_detector(config)
    backbone = model.backbone
    assert isinstance(backbone, EfficientViT)
    with_masks = has_masks(cfg)
    batch = synthetic_batch(with_masks)

    model.train()
    data = model.data_preprocessor(batch, training=True)
    losses = model(**data, mode='loss')
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss), log_vars
    assert all(np.isfinite(float(v)) for v in log_vars.values()), log_vars
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f'parameters no gradient reached (DDP would need ' \
                        f'find_unused_parameters): {no_grad[:10]}'
    assert any(n.startswith('backbone.') for n, _ in trainable)
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f'non-finite gradients: {bad[:10]}'
    # the backbone builds the stages up to its last output level, and nothing more
    assert len(backbone.stages) == max(backbone.out_indices) - 1

    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, training=False), mode='predict')
    assert len(results) == 2
    for r in results:
        pred = r.pred_instances
        n = len(pred.scores)
        assert pred.bboxes.shape == (n, 4) and pred.labels.shape == (n,)
        assert torch.isfinite(pred.bboxes).all()
        if with_masks:
            assert tuple(pred.masks.shape) == (n, SIZE, SIZE)


@pytest.fixture(scope='module')
def synthetic_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('matrix') / 'data', num_train=8, num_val=4,
                        size=SIZE, seed=3)


def on_synthetic_data(cfg: Config, data_root: str) -> Config:
    """``cfg``'s datasets (pipelines untouched) reading the synthetic dataset at ``data_root``."""
    root = data_root.rstrip('/') + '/'
    for split, loader in (('train', 'train_dataloader'), ('val', 'val_dataloader'),
                          ('val', 'test_dataloader')):
        ds = cfg[loader].dataset
        while 'dataset' in ds:  # wrappers (RepeatDataset, ...)
            ds = ds.dataset
        ds.update(data_root=root, ann_file=f'annotations/instances_{split}.json',
                  data_prefix=dict(img=f'{split}/'), metainfo=dict(classes=SYNTHETIC_CLASSES))
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = root + 'annotations/instances_val.json'
    return cfg


@pytest.mark.parametrize('config', CONFIGS, ids=IDS)
def test_config_data_pipelines_run(config, synthetic_data):
    """The config's own training and evaluation pipelines (mosaic, multi-scale crops, ...)
    give model-ready samples."""
    from mmengine.registry import DATASETS
    cfg = on_synthetic_data(Config.fromfile(config), synthetic_data)
    for loader, train in (('train_dataloader', True), ('val_dataloader', False)):
        dataset = DATASETS.build(cfg[loader].dataset)
        for i in range(3):  # the caches of mosaic / mixup fill up over the first samples
            item = dataset[i % len(dataset)]
            img, sample = item['inputs'], item['data_samples']
            assert img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3
            assert tuple(img.shape[1:]) == tuple(sample.img_shape) or 'pad_shape' in sample
            if train:
                assert sample.gt_instances.bboxes.shape[-1] == 4


def _options(config):
    return SMALL_IMAGE_OPTIONS.get(osp.basename(config).split('_efficientvit')[0], {})


# one config per detector and neck (the m0-m3/m5 RetinaNet and Mask R-CNN configs differ from
# their m4 config in the arch and the neck's input channels only)
FLOPS_CONFIGS = [c for c in CONFIGS if not re.search(r'_m[0-35]_coco\.py$', c)]


@pytest.mark.parametrize('config', FLOPS_CONFIGS, ids=[osp.basename(c)[:-3] for c in FLOPS_CONFIGS])
def test_config_flops_are_counted(config):
    """What ``python -m benchmarks flops --detector CONFIG`` reports: a count for every part
    (two-stage and DETR-style detectors' ``_forward`` get the image metas they read)."""
    from benchmarks.flops import detector_report
    options = dict(_options(config))
    if 'model.test_cfg.rpn.max_per_img' in options:  # the tensor forward's RoI heads see them all
        options['model.test_cfg.rpn.max_per_img'] = 10
    d = detector_report(config, SIZE, SIZE, cfg_options=options)
    parts = d['parts']
    assert parts['backbone']['macs'] > 0 and parts['neck']['macs'] > 0, d
    assert parts['heads']['macs'] > 0, d
    assert sum(p['macs'] for p in parts.values()) == d['macs']
    assert sum(p['params'] for p in parts.values()) == d['params']


def test_benchmarks_flops_command_on_a_two_stage_config(tmp_path):
    """The command line on Mask R-CNN, where it crashed (``TwoStageDetector._forward()
    missing 'batch_data_samples'``), with an mmdet-style --cfg-options."""
    out = tmp_path / 'flops.json'
    configs = [osp.join(ROOT, 'configs', 'mask_rcnn_efficientvit_m4_coco.py')]
    run([PY, '-m', 'benchmarks', 'flops', '--arch', 'none', '--detector', *configs,
         '--shape', str(SIZE), '--cfg-options', 'model.test_cfg.rpn.max_per_img=10',
         '--json', out], timeout=600)
    dets = json.loads(out.read_text())['detectors']
    assert [d['config'] for d in dets] == configs
    assert all(d['parts']['heads']['macs'] > 0 for d in dets)


# ---------------------------------------------------------------------------------------------
# the backbone computes what is asked
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('out_indices, stages, stem_convs', [
    ((0,), 0, 2), ((0, 1), 0, 3), ((1, 2, 3), 2, 4), ((2, 3), 2, 4), ((2, 3, 4), 3, 4),
    ((4,), 3, 4)])
def test_backbone_builds_and_trains_only_up_to_the_last_level(out_indices, stages, stem_convs):
    model = EfficientViT('m0', out_indices=out_indices, attn_backend='module').train()
    assert len(model.stages) == stages
    assert sum(hasattr(model.patch_embed, f'conv{i}') for i in range(1, 5)) == stem_convs
    x = torch.randn(2, 3, 128, 192)
    outs = model(x)
    assert [o.shape[1] for o in outs] == model.out_channels
    assert [128 // o.shape[2] for o in outs] == model.out_strides
    sum(o.square().mean() for o in outs).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def _full_and_truncated(out_indices=(2, 3)):
    from efficientvit_det.testing import randomize_
    full = randomize_(EfficientViT('m0', attn_backend='module'), seed=1).eval()
    part = EfficientViT('m0', out_indices=out_indices, attn_backend='module').eval()
    return full, part


def _assert_same_levels(full, part):
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(x), part(x)
    for i, level in enumerate(part.out_indices):
        torch.testing.assert_close(b[i], a[full.out_indices.index(level)])


@pytest.mark.parametrize('layout', ['ours', 'msra', 'timm_file'])
def test_full_checkpoint_loads_into_a_backbone_that_stops_early(layout, tmp_path, log):
    from helpers import timm_to_msra
    full, part = _full_and_truncated()
    sd = full.state_dict()
    if layout == 'ours':  # a detector checkpoint of this project, loaded strictly
        holder = torch.nn.Module()
        holder.backbone = part
        holder.load_state_dict({f'backbone.{k}': v for k, v in sd.items()}, strict=True)
    elif layout == 'msra':  # the original's released detectors hold the MSRA layout
        holder = torch.nn.Module()
        holder.backbone = part
        holder.load_state_dict({f'backbone.{k}': v for k, v in timm_to_msra(sd).items()},
                               strict=True)
    else:  # a classification checkpoint through init_cfg
        from efficientvit_det.checkpoint.backbone import load_pretrained
        torch.save(sd, tmp_path / 'cls.pth')
        missing, unexpected = load_pretrained(part, str(tmp_path / 'cls.pth'))
        assert missing == [] and unexpected == []
    _assert_same_levels(full, part)
    text = log.text(level=0)
    lines = [ln for ln in text.splitlines() if 'parts not built' in ln]
    n_stage3 = sum(k.startswith('stages.2.') for k in sd)
    assert len(lines) == 1 and f'ignored {n_stage3} checkpoint tensors' in lines[0], text
    assert 'stages.2' in lines[0] and 'unexpected' not in text


def test_truncated_backbone_trains_without_unused_parameters_in_a_detector():
    """FCOS asking for strides 16 and 32 only: no stage 3, every parameter gets a gradient
    (the test_workflow_ddp.py DDP run checks the same through mmengine's DDP wrapper)."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'fcos_efficientvit_m4_coco.py'))
    cfg.model.backbone.update(init_cfg=None, arch='m0', out_indices=(2, 3))
    cfg.model.neck.update(in_channels=[64, 128], out_channels=64)
    cfg.model.bbox_head.update(in_channels=64, feat_channels=64, stacked_convs=1)
    model = MODELS.build(cfg.model).train()
    assert len(model.backbone.stages) == 2
    data = model.data_preprocessor(synthetic_batch(False), training=True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------
def _counts(model, inputs):
    """mmengine's default FLOP and activation counts (what get_flops.py uses), by operator, and
    the benchmarks' multiply-adds."""
    from mmengine.analysis import ActivationAnalyzer, FlopAnalyzer

    from benchmarks.flops import analyze
    out = []
    for analyzer in (FlopAnalyzer(model, inputs), ActivationAnalyzer(model, inputs)):
        analyzer.unsupported_ops_warnings(False)
        analyzer.tracer_warnings('none')
        out.append((analyzer.total(), dict(analyzer.by_operator())))
        assert 'efficientvit_det::cga' not in analyzer.unsupported_ops()  # element-wise ops are
    return out[0], out[1], analyze(model, inputs)['total']


class _FusedOp(torch.nn.Module):
    """The registered op called directly on a LocalWindowAttention's folded weights."""

    def __init__(self, lwa, backend):
        super().__init__()
        self.lwa, self.backend = lwa, backend

    def forward(self, x):
        from efficientvit_det.ops import cascaded_group_attention
        a = self.lwa.attn
        return cascaded_group_attention(x, **a.fused_params(), key_dim=a.key_dim,
                                        window_size=self.lwa.window_size, scale=a.scale,
                                        backend=self.backend)


@pytest.mark.parametrize('dim, heads, kernels, hw', [
    (128, 4, (7, 5, 3, 3), (50, 84)), (384, 4, (7, 5, 3, 3), (13, 21)), (64, 4, (5, 5, 5, 5), (9, 9))])
def test_fused_op_is_counted_as_the_module_path(dim, heads, kernels, hw):
    """The traced ``efficientvit_det::cga`` node counts (FLOPs by operator, activations,
    multiply-adds) exactly what the module path's Conv+BN / matmul ops count: the handle of
    efficientvit_det/models/complexity.py, registered with mmengine's defaults on import."""
    from efficientvit_det.models.backbones.efficientvit import LocalWindowAttention
    from efficientvit_det.ops import cpu_extension_status
    from efficientvit_det.testing import randomize_
    if not cpu_extension_status()[0]:
        pytest.skip('the C++ attention kernel is not built')
    lwa = randomize_(LocalWindowAttention(dim, 16, heads, 7, kernels, 'module')).eval()
    x = (torch.randn(1, dim, *hw),)
    module = _counts(lwa, x)
    for backend in ('cpu', 'fused'):
        assert _counts(_FusedOp(lwa, backend), x) == module, backend


def test_backbone_flops_are_the_same_for_every_attention_backend():
    """Through the backbone (as get_flops.py sees it), every attention backend counts the same,
    and the benchmarks' multiply-adds equal the closed-form hand count."""
    from mmengine.analysis import FlopAnalyzer

    from benchmarks.flops import analyze, hand_count_macs
    from efficientvit_det.ops import cpu_extension_status
    model = EfficientViT('m4').eval()
    x = (torch.randn(1, 3, 100, 150),)
    counts = {}
    for backend in ['module', 'auto'] + (['fused'] if cpu_extension_status()[0] else []):
        fa = FlopAnalyzer(model.set_attn_backend(backend), x)
        fa.unsupported_ops_warnings(False)
        fa.tracer_warnings('none')
        counts[backend] = dict(fa.by_operator())
    assert all(c == counts['module'] for c in counts.values()), counts
    assert analyze(model, x)['total'] == hand_count_macs('m4', 100, 150)['total']


def test_flop_handle_reads_each_heads_kernel():
    """The per-head kernels (7, 5, 3, 3 for m4) are zero-embedded in the op's 7x7 weight: the
    handle reads them from the trace (the test above), or from a constant weight's zero
    border; the count is the reference path's."""
    from efficientvit_det.models.complexity import cga_counts, kernels_from_weight
    w = torch.zeros(4, 16, 7, 7)
    for h, k in enumerate((7, 5, 3, 3)):
        o = (7 - k) // 2
        w[h, :, o:o + k, o:o + k] = torch.rand(16, k, k) + 0.1
    assert kernels_from_weight(w) == [7, 5, 3, 3]
    c = cga_counts((1, 128, 10, 13), (4, 64, 32), (128, 128), 16, 7, [7, 5, 3, 3])
    tokens = 14 * 14  # zero-padded to whole 7x7 windows
    assert c['conv'] == 4 * tokens * 32 * 64 + tokens * 16 * (49 + 25 + 9 + 9) + tokens * 128 * 128
    assert c['matmul'] == 4 * tokens * 49 * (16 + 32)
    assert c['batch_norm'] == 2 * tokens * (4 * (64 + 16) + 128)


def _synthetic_child(path, base, data_root):
    """``base`` (a RetinaNet) reading the synthetic dataset (6 classes), evaluation at 128 px,
    no ImageNet checkpoint."""
    root = str(data_root).rstrip('/') + '/'
    text = textwrap.dedent(f'''
        _base_ = [{base!r}]
        data_root = {root!r}
        model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=6))
        _test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=({SIZE}, {SIZE}), keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
        ]
        _metainfo = dict(classes={SYNTHETIC_CLASSES!r})
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(data_root=data_root, metainfo=_metainfo,
                         ann_file='annotations/instances_train.json',
                         data_prefix=dict(img='train/')))
        val_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(data_root=data_root, metainfo=_metainfo, pipeline=_test_pipeline,
                         ann_file='annotations/instances_val.json',
                         data_prefix=dict(img='val/')))
        test_dataloader = val_dataloader
        val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
        test_evaluator = val_evaluator
        ''')
    path.write_text(text)
    return str(path)


def _get_flops(config, backend):
    r = run([PY, osp.join(MMDET_TOOLS, 'analysis_tools', 'get_flops.py'), config,
             '--num-images', '1', '--cfg-options', f'model.backbone.attn_backend={backend}'],
            timeout=300)
    text = r.stdout + r.stderr
    m = re.search(r'Input shape: \((\d+), (\d+)\)\s+Flops: ([\d.]+)([KMGT]?)', text)
    assert m, text[-3000:]
    assert 'Unsupported operator efficientvit_det::cga' not in text
    scale = {'': 1, 'K': 1e3, 'M': 1e6, 'G': 1e9, 'T': 1e12}[m.group(4)]
    return (int(m.group(1)), int(m.group(2))), float(m.group(3)) * scale, m.group(3) + m.group(4)


def test_mmdet_get_flops_equals_the_projects_count_for_every_backend(tmp_path, synthetic_data):
    """mmdet's own tools/analysis_tools/get_flops.py on the flagship (M4 RetinaNet) reading the
    synthetic images: its count is the project's (``--convention mmengine``), the same for every
    attention backend."""
    from mmengine.analysis.print_helper import _format_size

    from benchmarks.flops import detector_report
    from efficientvit_det.ops import cpu_extension_status
    child = _synthetic_child(tmp_path / 'flagship_synthetic.py', FLAGSHIP_CONFIG, synthetic_data)
    backends = ['module', 'auto'] + (['fused'] if cpu_extension_status()[0] else [])
    results = {b: _get_flops(child, b) for b in backends}
    shape = results['module'][0]
    assert shape == (SIZE, SIZE)
    ours = detector_report(child, *shape, convention='mmengine')['macs']
    for backend, (s, flops, text) in results.items():
        assert s == shape and text == _format_size(ours), (backend, results, ours)
        assert abs(flops / ours - 1) < 0.01


# ---------------------------------------------------------------------------------------------
# mmdet's other tools on the flagship
# ---------------------------------------------------------------------------------------------
def test_mmdet_benchmark_dataloader_and_test_tool_run_on_the_flagship(tmp_path, synthetic_data):
    child = _synthetic_child(tmp_path / 'flagship_synthetic.py', FLAGSHIP_CONFIG, synthetic_data)
    r = run([PY, osp.join(MMDET_TOOLS, 'analysis_tools', 'benchmark.py'), child,
             '--task', 'dataloader', '--max-iter', '4', '--num-warmup', '1',
             '--log-interval', '2', '--work-dir', tmp_path / 'bench'], timeout=300)
    text = r.stdout + r.stderr
    assert re.search(r'Overall fps: [\d.]+ (img|batch)/s', text), text[-3000:]

    # tools/test.py of mmdet with a checkpoint of random weights, --out predictions
    from mmengine.runner import save_checkpoint

    from efficientvit_det.apis import init_detector
    model = init_detector(child)
    save_checkpoint(dict(state_dict=model.state_dict()), str(tmp_path / 'random.pth'))
    out = tmp_path / 'preds.pkl'
    r = run([PY, osp.join(MMDET_TOOLS, 'test.py'), child, tmp_path / 'random.pth',
             '--work-dir', tmp_path / 'test', '--out', out,
             '--cfg-options', 'model.test_cfg.score_thr=0.0'], timeout=300)
    text = r.stdout + r.stderr
    assert re.search(r'coco/bbox_mAP: [\d.]+', text), text[-3000:]
    assert out.is_file() and os.path.getsize(out) > 0
