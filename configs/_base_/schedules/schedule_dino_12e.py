# DINO's own 12-epoch recipe (mmdet's configs/dino/dino-4scale_r50_8xb2-12e_coco.py):
# AdamW lr 1e-4, weight decay 1e-4, gradient clipping at norm 0.1, the backbone at 0.1x the
# lr (EfficientViT's attention bias tables too, and without weight decay, as in every
# EfficientViT recipe), no warm-up, lr x0.1 at epoch 11, 12 epochs, for a total batch of 16
# (8 GPUs x 2 images).
train_cfg = dict(type='ResumableEpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[11], gamma=0.1)
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    # the longest matching key wins: the bias tables keep the backbone's 0.1x lr
    paramwise_cfg=dict(custom_keys={
        'backbone': dict(lr_mult=0.1),
        'attention_biases': dict(lr_mult=0.1, decay_mult=0.)}))

# `tools/train.py --auto-scale-lr` (or enable=True) scales the lr linearly from this batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
