# COCO 2017 detection with the DETR-family training augmentation (DINO, Deformable DETR):
# flip 0.5, then either a multi-scale resize (shorter side 480..800, longer <= 1333) or a
# resize + random crop (384..600) + multi-scale resize; images without boxes are kept.
# Evaluation is ./coco_detection.py's (1333x800). From mmdet's
# configs/dino/dino-4scale_r50_8xb2-12e_coco.py.
_base_ = './coco_detection.py'
backend_args = None

_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
           (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='RobustLoadImageFromFile', on_error='skip', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
            [
                dict(
                    type='RandomChoiceResize',
                    scales=[(400, 4200), (500, 4200), (600, 4200)],
                    keep_ratio=True),
                dict(
                    type='RandomCrop',
                    crop_type='absolute_range',
                    crop_size=(384, 600),
                    allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)
            ]
        ]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    dataset=dict(filter_cfg=dict(filter_empty_gt=False), pipeline=train_pipeline))
