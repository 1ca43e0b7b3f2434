# Mask R-CNN + EfficientViT-M0 + EfficientViTFPN, COCO 2017 instances, 1x: the M4 recipe
# with another backbone (only the arch, its checkpoint and the neck's input channels change).
_base_ = './mask_rcnn_efficientvit_m4_coco.py'

model = dict(
    backbone=dict(
        arch='m0',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientvit_m0.pth')),
    neck=dict(in_channels=[64, 128, 192]))
