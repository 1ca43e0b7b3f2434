# Mask R-CNN + EfficientViT-M4 + EfficientViTFPN, COCO 2017 instances, 1x schedule (12 epochs).
# The original recipe (MSRA EfficientViT, mmdet 2.x) in mmengine terms; the paper reports
# mask AP 31.0 / AP50 51.2 / AP75 32.2 on val2017 with 8 GPUs x 2 images.
#
#   python tools/train.py configs/mask_rcnn_efficientvit_m4_coco.py
#   bash tools/dist_train.sh configs/mask_rcnn_efficientvit_m4_coco.py 8
#   python tools/test.py configs/mask_rcnn_efficientvit_m4_coco.py CKPT     # bbox + segm AP
#
# CKPT may be the original's released mask_rcnn_efficientvit_m4_fpn_1x_coco.pth as it is
# (docs/model_zoo.md). The backbone starts from an ImageNet-1k checkpoint (MSRA 'model' dict or
# timm layout): put it at checkpoints/efficientvit_m4.pth, or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=/path/to/efficientvit_m4.pth
# With a total batch other than 16, add --auto-scale-lr to scale the lr linearly.
_base_ = [
    './_base_/models/mask_rcnn_efficientvit_fpn.py',
    './_base_/datasets/coco_instance.py',
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
    roi_head=dict(bbox_head=dict(num_classes=80), mask_head=dict(num_classes=80)))

train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
