# RTMDet's own 300-epoch recipe (mmdet's configs/rtmdet/rtmdet_l_8xb32-300e_coco.py):
# AdamW lr 0.004, weight decay 0.05 (none on norms, biases and the attention bias tables),
# linear warm-up over 1000 iterations from 1e-5x, constant lr to epoch 150, then cosine to
# 0.05x at epoch 300; validation every 10 epochs, and every epoch over the last 20 (the
# epochs without mosaic and mixup: the PipelineSwitchHook in the detector config), for a
# total batch of 256 (8 GPUs x 32 images). The EMA of the weights (EMAHook) is in the
# detector config too.
max_epochs = 300
stage2_num_epochs = 20
base_lr = 0.004
interval = 10

train_cfg = dict(
    type='ResumableEpochBasedTrainLoop',
    max_epochs=max_epochs,
    val_interval=interval,
    dynamic_intervals=[(max_epochs - stage2_num_epochs, 1)])
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=1.0e-5, by_epoch=False, begin=0, end=1000),
    dict(
        type='CosineAnnealingLR',
        eta_min=base_lr * 0.05,
        begin=max_epochs // 2,
        end=max_epochs,
        T_max=max_epochs // 2,
        by_epoch=True,
        convert_to_iter_based=True),
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=base_lr, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True,
        # EfficientViT's attention bias tables are never decayed (every EfficientViT recipe)
        custom_keys={'attention_biases': dict(decay_mult=0.)}))

# `tools/train.py --auto-scale-lr` (or enable=True) scales the lr linearly from this batch.
auto_scale_lr = dict(enable=False, base_batch_size=256)
