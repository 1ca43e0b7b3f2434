# Mask R-CNN + EfficientViT-M2 + EfficientViTFPN, COCO 2017 instances, 1x: the M4 recipe
# with another backbone (only the arch, its checkpoint and the neck's input channels change).
_base_ = './mask_rcnn_efficientvit_m4_coco.py'

model = dict(
    backbone=dict(
        arch='m2',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientvit_m2.pth')),
    neck=dict(in_channels=[128, 192, 224]))
