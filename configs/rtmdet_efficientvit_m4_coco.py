# RTMDet (RTMDet-s neck and head) + EfficientViT-M4, COCO 2017, RTMDet's own 300-epoch recipe
# (AdamW lr 0.004, weight decay 0.05, flat then cosine lr, EMA of the weights, mosaic + mixup
# at 640x640 switched off for the last 20 epochs), for 8 GPUs x 32 images.
# Levels (docs/detectors.md): stages 1-3 at strides 16/32/64 plus a transposed-conv stride-8
# level (EfficientViTFPN, 128 channels), then RTMDet's CSPNeXtPAFPN -> 4 levels at strides
# 8..64 for the head.
#
#   python tools/train.py configs/rtmdet_efficientvit_m4_coco.py
#   bash tools/dist_train.sh configs/rtmdet_efficientvit_m4_coco.py 8
#
# The backbone starts from an ImageNet-1k checkpoint (MSRA 'model' dict or timm layout):
# put it at checkpoints/efficientvit_m4.pth, or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
# With a total batch other than 256, add --auto-scale-lr to scale the lr linearly.
# The neck is a list (two necks in a row): another arch restates both, e.g. for m0
# in_channels=[64, 128, 192] in the EfficientViTFPN entry (docs/detectors.md).
_base_ = [
    './_base_/models/rtmdet_efficientvit.py',
    './_base_/datasets/coco_detection_rtmdet.py',
    './_base_/schedules/schedule_rtmdet_300e.py',
    './_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        arch='m4',
        out_indices=(2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientvit_m4.pth')),
    bbox_head=dict(num_classes=80))

default_hooks = dict(checkpoint=dict(interval=10, max_keep_ckpts=3))
# the runtime's NaN/inf and skipped-image hooks, then RTMDet's EMA and pipeline switch
custom_hooks = [
    dict(type='NonFiniteLossHook'),
    dict(type='SkippedImagesHook'),
    dict(
        type='EMAHook',
        ema_type='ExpMomentumEMA',
        momentum=0.0002,
        update_buffers=True,
        priority=49),
    dict(
        type='PipelineSwitchHook',
        switch_epoch=280,
        switch_pipeline={{_base_.train_pipeline_stage2}}),
]
auto_scale_lr = dict(enable=False, base_batch_size=256)
