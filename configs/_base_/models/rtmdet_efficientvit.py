# RTMDet with an EfficientViT backbone (m4 by default), sized like RTMDet-s (whose CSPNeXt
# backbone has about as many parameters as EfficientViT-M4: 8.9M vs 8.8M).
# RTMDet's CSPNeXtPAFPN and head work on strides 8/16/32; EfficientViT's stages are at
# 16/32/64. The neck is two necks in a row (mmengine builds a list of neck configs as
# nn.Sequential):
#   1. EfficientViTFPN: the three stages plus one transposed-conv level -> strides
#      8/16/32/64, 128 channels (the stride-8 level is made as in the original's RetinaNet);
#   2. CSPNeXtPAFPN (RTMDet-s: 128 channels, 1 CSP block): RTMDet's own top-down + bottom-up
#      path over those four levels.
# The head predicts on all four levels (strides 8..64, like RTMDet's P6 models): the
# stride-64 stage is used, so nothing is computed for nothing. Inputs are padded to a
# multiple of 64 so that every level is exactly half the previous one (the PAFPN upsamples by
# 2 and concatenates). Head, assigner and test settings are mmdet's RTMDet-s
# (configs/rtmdet/rtmdet_s_8xb32-300e_coco.py), with BN instead of SyncBN (single-process and
# CPU runs; set norm_cfg=dict(type='SyncBN') for multi-GPU training as mmdet does).
norm_cfg = dict(type='BN')
model = dict(
    type='RTMDet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=64,
        batch_augments=None),
    backbone=dict(
        type='EfficientViT',
        arch='m4',
        out_indices=(2, 3, 4),
        frozen_stages=-1,
        norm_eval=True,
        with_cp=False,
        attn_backend='auto'),
    neck=[
        dict(
            type='EfficientViTFPN',
            in_channels=[128, 256, 384],
            out_channels=128,
            start_level=0,
            num_outs=4,
            num_extra_trans_convs=1),
        dict(
            type='CSPNeXtPAFPN',
            in_channels=[128, 128, 128, 128],
            out_channels=128,
            num_csp_blocks=1,
            expand_ratio=0.5,
            norm_cfg=norm_cfg,
            act_cfg=dict(type='SiLU', inplace=True)),
    ],
    bbox_head=dict(
        type='RTMDetSepBNHead',
        num_classes=80,
        in_channels=128,
        stacked_convs=2,
        feat_channels=128,
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=[8, 16, 32, 64]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        with_objectness=False,
        exp_on_reg=False,
        share_conv=True,
        pred_kernel_size=1,
        norm_cfg=norm_cfg,
        act_cfg=dict(type='SiLU', inplace=True)),
    train_cfg=dict(
        assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=30000,
        min_bbox_size=0,
        score_thr=0.001,
        nms=dict(type='nms', iou_threshold=0.65),
        max_per_img=300))
