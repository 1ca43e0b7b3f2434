# RetinaNet + EfficientViT-M4 on the built-in synthetic shapes dataset, trained from
# scratch on a CPU in a few minutes (what `python tools/demo.py` runs).
#
#   python -m efficientvit_det.datasets.synthetic --out data/synthetic   # 800 + 200 images
#   python tools/train.py configs/retinanet_efficientvit_m4_demo.py
#
# Same detector as the COCO config (EfficientViT-M4 backbone, EfficientViTFPN with the
# stride-8 transposed conv, RetinaHead with focal + L1 losses), adapted to a 2-core CPU
# budget and to this dataset:
#   * no ImageNet checkpoint (none can be downloaded here): backbone from scratch, so its
#     BatchNorms train (norm_eval=False);
#   * 256 px images; neck and head 128 channels wide instead of 256 (2.5x faster per
#     iteration on CPU, the biggest cost at this input size);
#   * anchors octave_base_scale 2 instead of 4 (objects here are 13-128 px: the smallest
#     anchor is 16 px instead of 32);
#   * 6 classes; AdamW lr 1e-3 (from scratch, batch 8), warm-up 100 iterations,
#     lr x0.1 for the last epoch; validation only at the end.
_base_ = [
    './_base_/models/retinanet_efficientvit_fpn.py',
    './_base_/datasets/synthetic_detection.py',
    './_base_/schedules/schedule_1x_adamw.py',
    './_base_/default_runtime.py',
]

max_epochs = 5  # ~500 iterations: about 10 minutes on 2 CPU cores
model = dict(
    backbone=dict(arch='m4', out_indices=(2, 3, 4), norm_eval=False),
    neck=dict(in_channels=[128, 256, 384], out_channels=128),
    bbox_head=dict(
        num_classes=6,
        in_channels=128,
        feat_channels=128,
        anchor_generator=dict(octave_base_scale=2)))

train_dataloader = dict(batch_size=8, num_workers=2)
val_dataloader = dict(batch_size=8, num_workers=2)
test_dataloader = val_dataloader

train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[max_epochs - 1], gamma=0.1)
]
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2))
log_processor = dict(window_size=10)
