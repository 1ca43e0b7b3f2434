"""2-process DDP training on CPU (gloo, chosen automatically) through tools/dist_train.sh:
both ranks run, gradients are averaged, and both end with identical weights; a detector whose
backbone stops before its last stage trains without find_unused_parameters."""
import os
import os.path as osp
import re
import sys
import textwrap

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import ROOT, TOOLS, free_port, make_dataset, run, write_tiny_config  # noqa: E402

HOOK = '''
import os

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankWeightsHook(Hook):
    """Saves every rank's model state at the start and the end of training."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def _dump(self, runner, tag):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        rank = dist.get_rank()
        torch.save(dict(
            state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            world_size=dist.get_world_size(), backend=str(dist.get_backend()),
            wrapper=type(runner.model).__name__, iter=runner.iter,
            num_samples=len(runner.train_dataloader.batch_sampler.sampler)),
            os.path.join(self.out_dir, f'{tag}_rank{rank}.pth'))

    def before_train(self, runner):
        self._dump(runner, 'start')

    def after_train(self, runner):
        self._dump(runner, 'end')
'''


def test_ddp_two_processes_gloo_cpu(tmp_path):
    data = make_dataset(tmp_path / 'data', num_train=16, num_val=4, size=64, seed=2)
    (tmp_path / 'ddp_dump_hook.py').write_text(HOOK)
    dump = tmp_path / 'dump'
    dump.mkdir()
    # 16 images / (2 ranks x batch 2) = 4 iterations per epoch, 2 epochs.
    # norm_eval=True: BatchNorm statistics are frozen, so buffers must match too.
    cfg = write_tiny_config(tmp_path / 'ddp.py', data, size=64, max_epochs=2, batch_size=2,
                            extra=f'''
        custom_imports = dict(imports=['efficientvit_det', 'ddp_dump_hook'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='DumpRankWeightsHook', out_dir={str(dump)!r})]
        model = dict(backbone=dict(norm_eval=True))
        val_cfg = None
        val_dataloader = None
        val_evaluator = None
        ''')
    env = {'GPUS': '2', 'MASTER_PORT': str(free_port()),
           'PYTHONPATH': f'{tmp_path}{os.pathsep}{ROOT}'}
    r = run(['bash', osp.join(TOOLS, 'dist_train.sh'), cfg, '--work-dir',
             tmp_path / 'work', '--verbose'], env=env, timeout=400)  # mmengine's log lines
    text = r.stdout + r.stderr
    assert 'Epoch(train) [2][4/4]' in text, text[-3000:]

    s0 = torch.load(dump / 'start_rank0.pth', weights_only=True)
    e0 = torch.load(dump / 'end_rank0.pth', weights_only=True)
    e1 = torch.load(dump / 'end_rank1.pth', weights_only=True)
    for e in (e0, e1):
        assert e['world_size'] == 2 and e['backend'] == 'gloo'
        assert e['wrapper'] == 'MMDistributedDataParallel'
        assert e['iter'] == 8 and e['num_samples'] == 8  # each rank sees half the data
    # identical weights on both ranks ...
    assert e0['state_dict'].keys() == e1['state_dict'].keys()
    for k, v in e0['state_dict'].items():
        assert torch.equal(v, e1['state_dict'][k]), f'{k} differs between ranks'
    # ... and they are trained weights, not the initial ones
    changed = [k for k, v in s0['state_dict'].items()
               if v.is_floating_point() and not torch.equal(v, e0['state_dict'][k])]
    assert any(k.startswith('backbone.') for k in changed)
    assert any(k.startswith('bbox_head.') for k in changed)
    # the checkpoint written by rank 0 holds the same weights
    from _workflow_common import load_ckpt
    ck = load_ckpt(str(tmp_path / 'work' / 'epoch_2.pth'))['state_dict']
    assert all(torch.equal(ck[k], v) for k, v in e0['state_dict'].items())

    # distributed testing: 2 ranks share the 4 validation images, rank 0 reports COCO AP
    env['MASTER_PORT'] = str(free_port())
    r = run(['bash', osp.join(TOOLS, 'dist_test.sh'), cfg, tmp_path / 'work' / 'epoch_2.pth',
             '2', '--work-dir', tmp_path / 'test', '--verbose', '--cfg-options',
             'model.test_cfg.score_thr=0.0', 'test_dataloader.batch_size=1'], env=env,
            timeout=300)
    text = r.stdout + r.stderr
    assert re.search(r'coco/bbox_mAP: [\d.]+', text), text[-3000:]
    assert 'Epoch(test) [2/2]' in text  # 4 images / 2 ranks, batch 1


def test_dist_scripts_usage():
    for script, n in (('dist_train.sh', 'CONFIG [GPUS]'), ('dist_test.sh', 'CONFIG CHECKPOINT'),
                      ('slurm_train.sh', 'PARTITION JOB_NAME CONFIG WORK_DIR')):
        r = run(['bash', osp.join(TOOLS, script)], check=False)
        assert r.returncode == 2 and n in r.stderr, (script, r.stderr)
    text = open(osp.join(TOOLS, 'dist_train.sh')).read()
    for var in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'GPUS'):
        assert var in text


UNUSED_HOOK = '''
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RecordDDPHook(Hook):
    """Writes what the DDP wrapper was built with, and how many iterations ran."""

    def __init__(self, out):
        self.out = out

    def after_train(self, runner):
        if dist.get_rank() == 0:
            with open(self.out, 'w') as f:
                f.write(f"{type(runner.model).__name__} {runner.model.find_unused_parameters} "
                        f"{runner.iter} {len(runner.model.module.backbone.stages)}")
'''


def test_ddp_detector_up_to_stride_32_needs_no_find_unused_parameters(tmp_path):
    """The trap of issue 20: a backbone asked for levels up to stride 32 used to compute (and
    hold) the stride-64 stage, whose parameters get no gradient, so DDP stopped at the second
    iteration ("Expected to have finished reduction in the prior iteration ...") unless
    find_unused_parameters=True. FCOS (configs/fcos_efficientvit_m4_coco.py, shrunk: m0,
    64 px, 64-wide neck and head) with out_indices=(2, 3), 2 ranks x 2 iterations, mmengine's
    default DDP wrapper (find_unused_parameters=False)."""
    data = make_dataset(tmp_path / 'data', num_train=8, num_val=2, size=64, seed=4)
    (tmp_path / 'record_ddp_hook.py').write_text(UNUSED_HOOK)
    record = tmp_path / 'ddp.txt'
    root = data.rstrip('/') + '/'
    classes = ('circle', 'square', 'triangle', 'star', 'ring', 'cross')
    cfg = tmp_path / 'fcos_s32.py'
    cfg.write_text(textwrap.dedent(f'''
        _base_ = [{osp.join(ROOT, 'configs', 'fcos_efficientvit_m4_coco.py')!r}]
        custom_imports = dict(imports=['efficientvit_det', 'record_ddp_hook'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='RecordDDPHook', out={str(record)!r})]
        model = dict(
            backbone=dict(arch='m0', out_indices=(2, 3), init_cfg=None),
            neck=dict(in_channels=[64, 128], out_channels=64),
            bbox_head=dict(num_classes=6, in_channels=64, feat_channels=64, stacked_convs=1))
        train_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(64, 64), keep_ratio=True),
            dict(type='PackDetInputs')
        ]
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            dataset=dict(data_root={root!r}, metainfo=dict(classes={classes!r}),
                         ann_file='annotations/instances_train.json',
                         data_prefix=dict(img='train/'), pipeline=train_pipeline))
        train_cfg = dict(max_epochs=2, val_interval=2)
        param_scheduler = []
        default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
        val_cfg = None
        val_dataloader = None
        val_evaluator = None
        '''))
    assert 'find_unused_parameters' not in cfg.read_text()
    env = {'GPUS': '2', 'MASTER_PORT': str(free_port()),
           'PYTHONPATH': f'{tmp_path}{os.pathsep}{ROOT}'}
    r = run(['bash', osp.join(TOOLS, 'dist_train.sh'), cfg, '--work-dir', tmp_path / 'work',
             '--verbose'], env=env, timeout=400)
    text = r.stdout + r.stderr
    assert 'Epoch(train) [2][2/2]' in text, text[-3000:]
    # 8 images / (2 ranks x batch 2) = 2 iterations per epoch; stage 3 was never built
    assert record.read_text() == 'MMDistributedDataParallel False 4 2'
    from _workflow_common import load_ckpt
    ck = load_ckpt(str(tmp_path / 'work' / 'epoch_2.pth'))['state_dict']
    assert not any(k.startswith('backbone.stages.2.') for k in ck)
