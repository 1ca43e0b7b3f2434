# RetinaNet with an EfficientViT backbone (m4 by default) and the EfficientViTFPN neck,
# as in the original EfficientViT detection code (docs/facts.md).
# Backbone levels 2/3/4 = stages 1-3 at strides 16/32/64; the neck adds a stride-8 level
# through a transposed conv and a stride-128 level with a 3x3 s2 conv on the raw stride-64
# map, giving 5 outputs at strides 8..128 for the head.
model = dict(
    type='RetinaNet',
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
        add_extra_convs='on_input'),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[.0, .0, .0, .0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=100))
