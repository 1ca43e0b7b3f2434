# Runtime defaults (mmengine 0.10 / mmdet 3.x).
default_scope = 'mmdet'
# Registers EfficientViT / EfficientViTFPN, so that mmdet's own tools run these configs too.
custom_imports = dict(imports=['efficientvit_det'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

# A NaN/inf loss stops the run naming the iteration, before a bad state is checkpointed;
# images skipped by RobustLoadImageFromFile are counted in every log line.
custom_hooks = [dict(type='NonFiniteLossHook'), dict(type='SkippedImagesHook')]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py and tools/test.py switch to 'gloo' when CUDA is unavailable.
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
# mmdet's DetLocalVisualizer with labels 'circle 0.85' kept inside the image
# (efficientvit_det/engine/visualization.py)
visualizer = dict(type='EfficientViTDetVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
