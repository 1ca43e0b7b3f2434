# COCO 2017 instance segmentation (boxes + masks), standard layout:
#   data/coco/annotations/instances_{train,val}2017.json, data/coco/{train,val}2017/*.jpg
# The detection settings (./coco_detection.py) with the masks loaded (polygons / RLE -> bitmap
# masks), padded with the image by the model's data preprocessor (pad_mask=True), and COCO
# bbox + segm AP.
_base_ = './coco_detection.py'
backend_args = None

train_pipeline = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    # after Resize: the ground truth is not resized (evaluation is on the original scale)
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

# Test-time augmentation as for detection (two scales x flip); DetTTAModelWithMasks is mmdet's
# DetTTAModel that also keeps each surviving box's mask (mmdet's refuses masks).
tta_model = dict(type='DetTTAModelWithMasks')
