# Mask R-CNN + EfficientViT-M4 on the built-in synthetic shapes dataset (boxes + masks),
# trained from scratch on a CPU: the Mask R-CNN counterpart of retinanet_efficientvit_m0_demo.py.
#
#   python -m efficientvit_det.datasets.synthetic --out data/synthetic   # 2000 + 200 images
#   python tools/train.py configs/mask_rcnn_efficientvit_m4_synthetic.py
#   python tools/test.py configs/mask_rcnn_efficientvit_m4_synthetic.py work_dirs/.../epoch_5.pth
#
# Training takes about an hour on 2 CPU cores: 5 epochs x 250 iterations of batch 8, about
# 2.75 s per iteration on this project's AMD EPYC (--cfg-options train_cfg.max_epochs=1 for a
# 12-minute run).
#
# Same detector as the COCO config (EfficientViT-M4, EfficientViTFPN with two transposed convs,
# mmdet's standard RPN / RoI heads), adapted to a 2-core CPU budget and to this dataset:
#   * no ImageNet checkpoint: backbone from scratch, its BatchNorms train (norm_eval=False);
#   * 128 px images (the dataset default); neck and heads 128 channels wide (box head fc 512)
#     instead of 256 / 1024, 256 sampled RoIs per image instead of 512;
#   * RPN anchor scale 4 instead of 8 (objects here are 15-58 px: the smallest anchor is
#     16 px instead of 32);
#   * 6 classes; AdamW lr 1e-3 (from scratch, batch 8), warm-up 100 iterations, lr x0.1 for
#     the last epoch, gradient clipping; validation only at the end.
_base_ = [
    './_base_/models/mask_rcnn_efficientvit_fpn.py',
    './_base_/datasets/synthetic_instance.py',
    './_base_/schedules/schedule_1x_adamw.py',
    './_base_/default_runtime.py',
]

max_epochs = 5
width = 128
model = dict(
    backbone=dict(arch='m4', out_indices=(2, 3, 4), norm_eval=False),
    neck=dict(in_channels=[128, 256, 384], out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width,
                  anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=512, num_classes=6),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(in_channels=width, conv_out_channels=width, num_classes=6)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=256))))

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
