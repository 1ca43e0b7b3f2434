# Faster R-CNN + EfficientViT-M4 + EfficientViTFPN, COCO 2017, 1x schedule (12 epochs) with the
# original EfficientViT detection recipe (AdamW lr 1e-4, weight decay 0.05; _base_/schedules).
# Levels (docs/detectors.md): stages 1-3 at strides 16/32/64 and two transposed-conv levels
# at strides 8 and 4 -> strides 4..64, as the original's Mask R-CNN.
#
#   python tools/train.py configs/faster_rcnn_efficientvit_m4_coco.py
#   bash tools/dist_train.sh configs/faster_rcnn_efficientvit_m4_coco.py 8
#
# The backbone starts from an ImageNet-1k checkpoint (MSRA 'model' dict or timm layout):
# put it at checkpoints/efficientvit_m4.pth, or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
# The backbone and neck of the original's released Mask R-CNN checkpoint load too
# (load_from=...; the mask head's weights are then unused).
# With a total batch other than 16, add --auto-scale-lr to scale the lr linearly.
_base_ = [
    './_base_/models/faster_rcnn_efficientvit_fpn.py',
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
    neck=dict(in_channels=[128, 256, 384], out_channels=256, num_extra_trans_convs=2),
    roi_head=dict(bbox_head=dict(num_classes=80)))

train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
