# The built-in synthetic shapes dataset with instance masks (boxes + the COCO `segmentation`
# of each shape's visible part), for Mask R-CNN: ./synthetic_detection.py with the masks
# loaded and COCO bbox + segm AP.
#   python -m efficientvit_det.datasets.synthetic --out data/synthetic
_base_ = './synthetic_detection.py'
backend_args = None
img_scale = (128, 128)  # the generator's default image size

train_pipeline = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# Test-time augmentation (tools/test.py --tta): two scales x horizontal flip, merged with
# class-wise NMS; each surviving box keeps its own view's mask.
tta_model = dict(
    type='DetTTAModelWithMasks',
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
