# The original EfficientViT RetinaNet 1x recipe in mmengine terms:
# AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 (none on the attention bias tables),
# linear warm-up over 500 iterations from 0.001x, lr x0.1 at epochs 8 and 11, 12 epochs.
# The lr is meant for a total batch of 16 (8 GPUs x 2 images).
# EpochBasedTrainLoop that resumes a mid-epoch checkpoint at the right batch (mmengine's own
# retrains the epoch's first batches): docs/robustness.md.
train_cfg = dict(type='ResumableEpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'attention_biases': dict(decay_mult=0.)}))

# `tools/train.py --auto-scale-lr` (or enable=True) scales the lr linearly from this batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)
