"""Shared helpers of the workflow tests (tiny dataset, tiny config, subprocess runner)."""
import os
import os.path as osp
import socket
import subprocess
import sys
import textwrap

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
PY = sys.executable
DEMO_CONFIG = osp.join(ROOT, 'configs', 'retinanet_efficientvit_m0_demo.py')
FLAGSHIP_CONFIG = osp.join(ROOT, 'configs', 'retinanet_efficientvit_m4_coco.py')


def make_dataset(out, num_train, num_val, size=128, seed=0, difficulty='normal'):
    from efficientvit_det.datasets import generate_dataset
    generate_dataset(str(out), num_train, num_val, size=size, seed=seed,
                     difficulty=difficulty, verbose=False)
    return str(out)


def _write_tiny(path, base, data_root, size, max_epochs, batch_size, with_mask, model, extra):
    """A config inheriting ``base``, shrunk for CI: ``size`` px inputs, no dataloader workers,
    data at ``data_root``, ``max_epochs`` with a short warm-up, ``model`` overrides."""
    data_root = osp.abspath(data_root).rstrip('/') + '/'
    text = textwrap.dedent(f'''
        _base_ = [{base!r}]
        data_root = {data_root!r}
        img_scale = ({size}, {size})
        train_pipeline = [
            dict(type='RobustLoadImageFromFile', on_error='skip'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
            dict(type='Resize', scale=img_scale, keep_ratio=True),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs')
        ]
        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=img_scale, keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
        ]
        train_dataloader = dict(
            batch_size={batch_size}, num_workers=0, persistent_workers=False,
            dataset=dict(data_root=data_root, pipeline=train_pipeline))
        val_dataloader = dict(
            batch_size=8, num_workers=0, persistent_workers=False,
            dataset=dict(data_root=data_root, pipeline=test_pipeline))
        test_dataloader = val_dataloader
        val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
        test_evaluator = val_evaluator
        train_cfg = dict(max_epochs={max_epochs}, val_interval={max_epochs})
        param_scheduler = [
            dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=10),
            dict(type='MultiStepLR', begin=0, end={max_epochs}, by_epoch=True,
                 milestones=[{max_epochs}], gamma=0.1)
        ]
        default_hooks = dict(logger=dict(interval=5))
        ''') + 'model = ' + model + '\n' + textwrap.dedent(extra)
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def write_tiny_config(path, data_root, size=128, max_epochs=1, batch_size=4, extra=''):
    """The demo config shrunk for CI: EfficientViT-M0, a 64-wide neck/head with two convs."""
    model = ("dict(backbone=dict(arch='m0'), neck=dict(in_channels=[64, 128, 192], "
             "out_channels=64), bbox_head=dict(in_channels=64, feat_channels=64, "
             "stacked_convs=2))")
    return _write_tiny(path, DEMO_CONFIG, data_root, size, max_epochs, batch_size, False, model,
                       extra)


def run(cmd, timeout=300, env=None, cwd=ROOT, check=True):
    full_env = dict(os.environ)
    full_env['PYTHONPATH'] = ROOT + os.pathsep + full_env.get('PYTHONPATH', '')
    full_env.setdefault('PYTHON', PY)
    # One intra-op thread: the tiny test models gain little from two, and OpenMP thread
    # teams collapse (10x slower) when the 2 cores are shared with other processes.
    full_env.setdefault('OMP_NUM_THREADS', '1')
    if env:
        full_env.update(env)
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f'command failed ({r.returncode}): {" ".join(map(str, cmd))}\n'
                             f'--- stdout (tail) ---\n{r.stdout[-6000:]}\n'
                             f'--- stderr (tail) ---\n{r.stderr[-6000:]}')
    return r


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def load_ckpt(path):
    import torch

    import efficientvit_det  # noqa: F401  (allow-lists mmengine's checkpoint types)
    return torch.load(path, map_location='cpu', weights_only=True)


MASK_RCNN_SYNTH_CONFIG = osp.join(ROOT, 'configs', 'mask_rcnn_efficientvit_m4_synthetic.py')


def write_tiny_mask_rcnn_config(path, data_root, size=128, max_epochs=1, batch_size=4,
                                extra=''):
    """The synthetic Mask R-CNN config shrunk for CI: EfficientViT-M0, 64-wide neck and heads
    (box head fc 256, 128 sampled RoIs, 300 proposals)."""
    model = textwrap.dedent('''\
        dict(
            backbone=dict(arch='m0'),
            neck=dict(in_channels=[64, 128, 192], out_channels=64),
            rpn_head=dict(in_channels=64, feat_channels=64),
            roi_head=dict(
                bbox_roi_extractor=dict(out_channels=64),
                bbox_head=dict(in_channels=64, fc_out_channels=256),
                mask_roi_extractor=dict(out_channels=64),
                mask_head=dict(in_channels=64, conv_out_channels=64)),
            train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300),
                           rcnn=dict(sampler=dict(num=128))),
            test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))''')
    return _write_tiny(path, MASK_RCNN_SYNTH_CONFIG, data_root, size, max_epochs, batch_size,
                       True, model, extra)
