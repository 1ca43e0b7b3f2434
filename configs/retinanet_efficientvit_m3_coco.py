# RetinaNet + EfficientViT-M3 + EfficientViTFPN, COCO 2017, 1x: the M4 recipe with
# another backbone (only the arch, its checkpoint and the neck's input channels change).
_base_ = './retinanet_efficientvit_m4_coco.py'

model = dict(
    backbone=dict(
        arch='m3',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/efficientvit_m3.pth')),
    neck=dict(in_channels=[128, 240, 320]))
