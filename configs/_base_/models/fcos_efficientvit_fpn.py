# FCOS with an EfficientViT backbone (m4 by default) and the EfficientViTFPN neck.
# Backbone levels 2/3/4 = stages 1-3 at strides 16/32/64; the neck adds a stride-8 level
# through a transposed conv (as the original's RetinaNet) and a stride-128 level with a 3x3 s2
# conv on the stride-64 output ('on_output', ReLU first: FCOS's P6/P7 rule), giving 5 outputs
# at strides 8..128 -- the levels of mmdet's FCOS-R50 (P3-P7). The head and its settings are
# mmdet's FCOS with the centre-sampling / norm-on-bbox / centerness-on-reg / GIoU improvements
# (mmdet configs/fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py).
# docs/detectors.md explains the choice of levels for every detector family.
model = dict(
    type='FCOS',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='EfficientViT',
        arch='m4',
        out_indices=(2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        attn_backend='auto'),
    neck=dict(
        type='EfficientViTFPN',
        in_channels=[128, 256, 384],
        out_channels=256,
        start_level=0,
        num_outs=5,
        num_extra_trans_convs=1,
        add_extra_convs='on_output',
        relu_before_extra_convs=True),
    bbox_head=dict(
        type='FCOSHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        strides=[8, 16, 32, 64, 128],
        norm_on_bbox=True,
        centerness_on_reg=True,
        dcn_on_last_conv=False,
        center_sampling=True,
        conv_bias=True,
        loss_cls=dict(
            type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.6),
        max_per_img=100))
