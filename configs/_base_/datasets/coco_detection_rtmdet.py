# COCO 2017 detection with RTMDet's augmentation (mmdet's configs/rtmdet/rtmdet_s_8xb32-300e_coco.py):
# training at 640x640 with cached mosaic, large-scale jitter (0.5-2.0 of 1280), random crop,
# HSV jitter, flip and cached mixup; for the last epochs (`train_pipeline_stage2`, switched in
# by PipelineSwitchHook) without mosaic and mixup. Evaluation: resize to fit 640x640, pad to
# 640x640 with grey 114.
_base_ = './coco_detection.py'
backend_args = None

train_pipeline = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='CachedMosaic', img_scale=(640, 640), pad_val=114.0),
    dict(type='RandomResize', scale=(1280, 1280), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(640, 640)),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=(640, 640), pad_val=dict(img=(114, 114, 114))),
    dict(
        type='CachedMixUp',
        img_scale=(640, 640),
        ratio_range=(1.0, 1.0),
        max_cached_images=20,
        pad_val=(114, 114, 114)),
    dict(type='PackDetInputs')
]
train_pipeline_stage2 = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=(640, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(640, 640)),
    dict(type='YOLOXHSVRandomAug'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Pad', size=(640, 640), pad_val=dict(img=(114, 114, 114))),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(640, 640), keep_ratio=True),
    # after Resize: the ground truth is not resized (evaluation is on the original scale)
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Pad', size=(640, 640), pad_val=dict(img=(114, 114, 114))),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=32,
    num_workers=10,
    batch_sampler=None,
    pin_memory=True,
    dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=5, num_workers=10, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(proposal_nums=(100, 1, 10))
test_evaluator = val_evaluator
