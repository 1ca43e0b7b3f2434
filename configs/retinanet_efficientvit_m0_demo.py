# RetinaNet + EfficientViT-M0 on the built-in synthetic shapes dataset, trained from
# scratch on a CPU in about 6 minutes on 2 cores (what `python tools/demo.py` runs):
# COCO bbox mAP 0.59 on the 200 validation images.
#
#   python -m efficientvit_det.datasets.synthetic --out data/synthetic   # 2000 + 200 images
#   python tools/train.py configs/retinanet_efficientvit_m0_demo.py
#
# The COCO detector's design (EfficientViT backbone, EfficientViTFPN with the stride-8
# transposed conv, RetinaHead with focal + L1 losses), sized for a 2-core CPU budget and for
# this dataset (128 px images, objects of 15-58 px):
#   * no ImageNet checkpoint (none can be downloaded here): backbone from scratch, so its
#     BatchNorms train (norm_eval=False);
#   * EfficientViT-M0 and a 64-wide neck/head with 2 convs per branch instead of M4 and
#     256 x 4, at 128 px: 7.5x less time per iteration than the M4 / 128-wide / 256 px demo
#     config it replaces (the README's demo section has what was measured);
#   * GroupNorm in the head: trained from scratch, mAP 0.39 after 500 iterations instead of
#     0.14 without;
#   * anchors octave_base_scale 2 instead of 4: the smallest anchor is 16 px;
#   * 6 classes; AdamW lr 2e-3 (4e-3 learns slower), batch 8, warm-up 200 iterations,
#     cosine decay per iteration over 2000 iterations; validation only at the end.
_base_ = [
    './_base_/models/retinanet_efficientvit_fpn.py',
    './_base_/datasets/synthetic_detection.py',
    './_base_/schedules/schedule_1x_adamw.py',
    './_base_/default_runtime.py',
]

max_epochs = 8  # 2000 images, batch 8: 2000 iterations
model = dict(
    backbone=dict(arch='m0', out_indices=(2, 3, 4), norm_eval=False),
    neck=dict(in_channels=[64, 128, 192], out_channels=64),
    bbox_head=dict(
        num_classes=6,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        anchor_generator=dict(octave_base_scale=2)))

# 128 px images decode and augment in about a millisecond: loading them in the training
# process is faster on 2 cores than worker processes competing with the model for them.
train_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False)
val_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False)
test_dataloader = val_dataloader

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, T_max=max_epochs,
         eta_min_ratio=0.01, convert_to_iter_based=True)
]
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=50)
