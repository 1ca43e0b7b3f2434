# ATSS + EfficientViT-M4 + EfficientViTFPN, COCO 2017, 1x schedule (12 epochs) with the original
# EfficientViT detection recipe (AdamW lr 1e-4, weight decay 0.05; _base_/schedules).
# Levels (docs/detectors.md): stages 1-3 at strides 16/32/64, a transposed-conv stride-8
# level, a stride-128 extra conv -> strides 8..128.
#
#   python tools/train.py configs/atss_efficientvit_m4_coco.py
#   bash tools/dist_train.sh configs/atss_efficientvit_m4_coco.py 8
#
# The backbone starts from an ImageNet-1k checkpoint (MSRA 'model' dict or timm layout):
# put it at checkpoints/efficientvit_m4.pth, or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
# With a total batch other than 16, add --auto-scale-lr to scale the lr linearly.
_base_ = [
    './_base_/models/atss_efficientvit_fpn.py',
    './_base_/datasets/coco_detection.py',
    './_base_/schedules/schedule_1x_adamw.py',
    './_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        arch='m4',
        out_indices=(2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientvit_m4.pth')),
    neck=dict(in_channels=[128, 256, 384], out_channels=256, num_extra_trans_convs=1),
    bbox_head=dict(num_classes=80))

train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
