# The built-in synthetic shapes dataset (efficientvit_det.datasets.synthetic), COCO format:
#   python -m efficientvit_det.datasets.synthetic --out data/synthetic
# gives data/synthetic/{train,val}/*.jpg and data/synthetic/annotations/instances_{train,val}.json
# SafeCocoDataset = CocoDataset whose annotation file is validated first (a broken record is
# an error naming it, or a counted skip); docs/robustness.md.
dataset_type = 'SafeCocoDataset'
data_root = 'data/synthetic/'
backend_args = None
img_scale = (128, 128)  # the generator's default image size
metainfo = dict(
    classes=('circle', 'square', 'triangle', 'star', 'ring', 'cross'),
    palette=[(220, 20, 60), (0, 160, 0), (0, 60, 230), (230, 190, 0), (200, 0, 200),
             (0, 190, 190)])

# Training skips an unreadable image with a warning naming it (counted in the log by
# SkippedImagesHook); evaluation keeps mmdet's fail-fast loader, which DetInferencer expects.
train_pipeline = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]

train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader

val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# Test-time augmentation (tools/test.py CONFIG CKPT --tta): every image at two scales, each as
# is and flipped horizontally (4 views); mmdet's DetTTAModel flips the boxes back and merges the
# views with class-wise NMS. (synthetic_instance.py keeps each surviving box's own mask.)
tta_model = dict(
    type='DetTTAModel',
    tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
tta_img_scales = [img_scale, (320, 320)]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale=s, keep_ratio=True) for s in tta_img_scales],
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
            [dict(type='LoadAnnotations', with_bbox=True)],
            [dict(type='PackDetInputs',
                  meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor',
                             'flip', 'flip_direction'))]])
]
