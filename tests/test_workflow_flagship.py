"""The COCO configs: the flagship builds with the original recipe, and one training
iteration runs on a batch at its real input scale (1333x800, padded to 1344x800)."""
import json
import math
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import FLAGSHIP_CONFIG, ROOT  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import efficientvit_det  # noqa: E402,F401

ARCH_CHANNELS = {'m0': [64, 128, 192], 'm1': [128, 144, 192], 'm2': [128, 192, 224],
                 'm3': [128, 240, 320], 'm4': [128, 256, 384], 'm5': [192, 288, 384]}


def test_flagship_recipe():
    cfg = Config.fromfile(FLAGSHIP_CONFIG)
    assert cfg.custom_imports.imports == ['efficientvit_det']
    m = cfg.model
    assert m.type == 'RetinaNet'
    assert m.data_preprocessor.pad_size_divisor == 32
    assert m.backbone.type == 'EfficientViT' and m.backbone.arch == 'm4'
    assert m.backbone.out_indices == (2, 3, 4) and m.backbone.norm_eval is True
    assert m.backbone.frozen_stages == -1
    assert m.backbone.init_cfg.type == 'Pretrained'
    assert m.neck.type == 'EfficientViTFPN' and m.neck.in_channels == [128, 256, 384]
    assert (m.neck.out_channels, m.neck.start_level, m.neck.num_outs) == (256, 0, 5)
    assert m.neck.num_extra_trans_convs == 1 and m.neck.add_extra_convs == 'on_input'
    h = m.bbox_head
    assert h.type == 'RetinaHead' and h.num_classes == 80 and h.stacked_convs == 4
    assert h.anchor_generator.octave_base_scale == 4
    assert h.anchor_generator.scales_per_octave == 3
    assert h.anchor_generator.ratios == [0.5, 1.0, 2.0]
    assert h.anchor_generator.strides == [8, 16, 32, 64, 128]
    assert h.loss_cls.type == 'FocalLoss' and h.loss_bbox.type == 'L1Loss'
    assert (m.train_cfg.assigner.pos_iou_thr, m.train_cfg.assigner.neg_iou_thr) == (0.5, 0.4)
    assert m.test_cfg.nms_pre == 1000 and m.test_cfg.score_thr == 0.05
    assert m.test_cfg.nms.iou_threshold == 0.5 and m.test_cfg.max_per_img == 100
    # schedule
    opt = cfg.optim_wrapper.optimizer
    assert opt.type == 'AdamW' and opt.lr == 1e-4 and tuple(opt.betas) == (0.9, 0.999)
    assert opt.weight_decay == 0.05
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        'attention_biases': dict(decay_mult=0.)}
    warm, steps = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.by_epoch, warm.end) == ('LinearLR', 0.001,
                                                                       False, 500)
    assert steps.type == 'MultiStepLR' and steps.milestones == [8, 11] and steps.gamma == 0.1
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    # data
    assert cfg.train_dataloader.batch_size == 2
    ds = cfg.train_dataloader.dataset
    assert ds.type == 'SafeCocoDataset' and ds.data_root == 'data/coco/'
    # robustness defaults (docs/robustness.md): training skips and counts bad images,
    # evaluation fails fast; NaN/inf stop; mid-epoch resume continues at the right batch
    assert ds.pipeline[0].type == 'RobustLoadImageFromFile' and ds.pipeline[0].on_error == 'skip'
    assert cfg.val_dataloader.dataset.pipeline[0].type == 'LoadImageFromFile'
    assert [h.type for h in cfg.custom_hooks] == ['NonFiniteLossHook', 'SkippedImagesHook']
    assert cfg.train_cfg.type == 'ResumableEpochBasedTrainLoop'
    assert ds.ann_file == 'annotations/instances_train2017.json'
    assert ds.data_prefix.img == 'train2017/'
    resize = [t for t in ds.pipeline if t.type == 'Resize'][0]
    assert tuple(resize.scale) == (1333, 800) and resize.keep_ratio
    assert [t.prob for t in ds.pipeline if t.type == 'RandomFlip'] == [0.5]
    assert cfg.val_evaluator.type == 'CocoMetric' and cfg.val_evaluator.metric == 'bbox'
    assert cfg.val_evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'
    # the usual command-line overrides reach the right places
    cfg.merge_from_dict({'train_dataloader.dataset.data_root': '/x/',
                         'model.bbox_head.num_classes': 3,
                         'param_scheduler.1.milestones': [1, 2]})
    assert cfg.train_dataloader.dataset.data_root == '/x/'
    assert cfg.model.bbox_head.num_classes == 3
    assert cfg.param_scheduler[1].milestones == [1, 2]


@pytest.mark.parametrize('arch', sorted(ARCH_CHANNELS))
def test_arch_configs_build_and_run(arch):
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(ROOT, 'configs', f'retinanet_efficientvit_{arch}_coco.py'))
    assert cfg.model.backbone.arch == arch
    assert cfg.model.neck.in_channels == ARCH_CHANNELS[arch]
    assert cfg.model.backbone.init_cfg.checkpoint == f'checkpoints/efficientvit_{arch}.pth'
    assert cfg.optim_wrapper.optimizer.lr == 1e-4  # inherited recipe
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 128, 192))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3),
                                                    (1, 2)]


def test_flagship_one_iteration_at_1333x800(tmp_path):
    """The real data pipeline + model + optimizer of the flagship config, one step."""
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper
    from mmengine.runner import Runner
    init_default_scope('mmdet')

    # a two-image COCO-format set: 1000x600 -> 1333x800; 1200x700 -> 1333x778 (+pad)
    rng = np.random.default_rng(0)
    (tmp_path / 'train2017').mkdir()
    images, anns = [], []
    for i, (w, h) in enumerate([(1000, 600), (1200, 700)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / 'train2017' / f'{i}.jpg')
        images.append(dict(id=i + 1, file_name=f'{i}.jpg', width=w, height=h))
        for j, box in enumerate([[50, 60, 200, 150], [400, 300, 300, 250], [10, 10, 40, 40]]):
            anns.append(dict(id=10 * i + j + 1, image_id=i + 1, category_id=j + 1, bbox=box,
                             area=box[2] * box[3], iscrowd=0))
    cats = [dict(id=k + 1, name=f'c{k}') for k in range(80)]
    (tmp_path / 'annotations').mkdir()
    with open(tmp_path / 'annotations' / 'instances_train2017.json', 'w') as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)

    cfg = Config.fromfile(FLAGSHIP_CONFIG)
    cfg.model.backbone.init_cfg = None  # no ImageNet checkpoint on CI
    cfg.train_dataloader.dataset.data_root = str(tmp_path) + '/'
    cfg.train_dataloader.dataset.metainfo = dict(classes=tuple(c['name'] for c in cats))
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_dataloader.sampler.shuffle = False
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batch = next(iter(loader))
    assert len(batch['inputs']) == 2
    shapes = sorted(tuple(s.img_shape) for s in batch['data_samples'])
    assert shapes == [(778, 1333), (800, 1333)]

    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    # AdamW groups: no weight decay on the attention bias tables, 0.05 elsewhere
    names = {id(p): n for n, p in model.named_parameters()}
    n_bias = 0
    for group in optim.optimizer.param_groups:
        assert group['lr'] == 1e-4 and tuple(group['betas']) == (0.9, 0.999)
        for p in group['params']:
            if 'attention_biases' in names[id(p)]:
                n_bias += 1
                assert group['weight_decay'] == 0.0
            elif p.ndim > 1:
                assert group['weight_decay'] == 0.05
    assert n_bias == 6  # m4: 6 blocks with attention

    data = model.data_preprocessor(batch, True)
    assert tuple(data['inputs'].shape) == (2, 3, 800, 1344)  # padded to /32
    before = model.bbox_head.retina_cls.weight.detach().clone()
    log_vars = {k: float(torch.as_tensor(v).detach())
                for k, v in model.train_step(batch, optim).items()}
    assert math.isfinite(log_vars['loss'])
    assert log_vars['loss_cls'] > 0 and log_vars['loss_bbox'] > 0
    assert not torch.equal(before, model.bbox_head.retina_cls.weight)
    # the stride-8 level comes from the neck's transposed conv
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'][:1])
    assert [tuple(f.shape[-2:]) for f in feats] == [(100, 168), (50, 84), (25, 42), (13, 21),
                                                    (7, 11)]
