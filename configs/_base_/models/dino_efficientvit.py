# DINO (4 scales) with an EfficientViT backbone (m4 by default).
# DINO-R50 reads 4 levels at strides 8/16/32/64 (ResNet C3-C5 through a ChannelMapper, whose
# extra 3x3 s2 conv makes stride 64). EfficientViT's stages are at strides 16/32/64, so the
# neck is two necks in a row (mmengine builds a list of neck configs as nn.Sequential):
#   1. EfficientViTFPN: the three stages plus one transposed-conv level -> strides 8/16/32/64,
#      256 channels (the stride-8 level is made as in the original's RetinaNet);
#   2. ChannelMapper: 1x1 conv + GroupNorm per level, DINO's own input projection (the
#      encoder expects GroupNorm-ed inputs; the FPN's outputs are not normalised).
# All three stages are used, nothing is computed for nothing. Transformer, head, denoising and
# matching settings are mmdet's DINO-4scale (configs/dino/dino-4scale_r50_8xb2-12e_coco.py).
model = dict(
    type='DINO',
    num_queries=900,
    with_box_refine=True,
    as_two_stage=True,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
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
            out_channels=256,
            start_level=0,
            num_outs=4,
            num_extra_trans_convs=1),
        dict(
            type='ChannelMapper',
            in_channels=[256, 256, 256, 256],
            kernel_size=1,
            out_channels=256,
            act_cfg=None,
            norm_cfg=dict(type='GN', num_groups=32),
            num_outs=4),
    ],
    encoder=dict(
        num_layers=6,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_levels=4, dropout=0.0),
            ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.0))),
    decoder=dict(
        num_layers=6,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.0),
            cross_attn_cfg=dict(embed_dims=256, num_levels=4, dropout=0.0),
            ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.0)),
        post_norm_cfg=None),
    positional_encoding=dict(num_feats=128, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(
        type='DINOHead',
        num_classes=80,
        sync_cls_avg_factor=True,
        loss_cls=dict(
            type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    dn_cfg=dict(
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=100)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=300))
