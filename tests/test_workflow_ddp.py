"""2-process DDP training on CPU (gloo, chosen automatically) through tools/dist_train.sh:
both ranks run, gradients are averaged, and both end with identical weights."""
import os
import os.path as osp
import re
import sys

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
