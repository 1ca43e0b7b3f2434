# DINO (4 scales) + EfficientViT-M4, COCO 2017, DINO's own 12-epoch recipe (AdamW lr 1e-4,
# weight decay 1e-4, backbone lr x0.1, gradient clipping 0.1, lr x0.1 at epoch 11) and its
# multi-scale crop augmentation, for 8 GPUs x 2 images.
# Levels (docs/detectors.md): stages 1-3 at strides 16/32/64 plus a transposed-conv stride-8
# level (EfficientViTFPN), each projected by DINO's ChannelMapper (1x1 conv + GroupNorm)
# -> 4 levels at strides 8..64, the levels of DINO-4scale-R50.
#
#   python tools/train.py configs/dino_efficientvit_m4_coco.py
#   bash tools/dist_train.sh configs/dino_efficientvit_m4_coco.py 8
#
# The backbone starts from an ImageNet-1k checkpoint (MSRA 'model' dict or timm layout):
# put it at checkpoints/efficientvit_m4.pth, or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
# With a total batch other than 16, add --auto-scale-lr to scale the lr linearly.
# The neck is a list (two necks in a row): another arch restates both, e.g. for m0
# in_channels=[64, 128, 192] in the EfficientViTFPN entry (docs/detectors.md).
_base_ = [
    './_base_/models/dino_efficientvit.py',
    './_base_/datasets/coco_detection_detr.py',
    './_base_/schedules/schedule_dino_12e.py',
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

train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
