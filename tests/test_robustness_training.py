"""Training robustness with a real mmengine Runner and a toy model (fast, CPU):

* a NaN loss, or a finite loss with an inf gradient, stops training with a message naming
  the iteration and epoch; the last good checkpoint is kept (and not deleted by
  max_keep_ckpts), the bad state is never written;
* a run killed with SIGKILL mid-epoch and resumed ends with exactly the weights and
  metrics of an uninterrupted run (deterministic mode, random augmentation in dataloader
  workers) with ResumableEpochBasedTrainLoop; mmengine's EpochBasedTrainLoop does not;
* skipped images reach the training log (SkippedImagesHook).

Run as a script, this file is the child process of the SIGKILL test.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import efficientvit_det.datasets.coco_checks  # noqa: F401  (SafeCocoDataset, RobustLoad...)
import efficientvit_det.engine  # noqa: F401  (registers the hooks and the loop)
from efficientvit_det.engine import NonFiniteLossError

HERE = osp.dirname(osp.abspath(__file__))


# -- toy components (registered in mmengine's root registries, seen from scope 'mmdet') ----
@DATASETS.register_module(name='RobustnessToyDataset', force=True)
class ToyDataset(Dataset):
    """y = <w, x> + 0.5; ``noise`` adds a random augmentation drawn from numpy's global RNG
    (seeded per dataloader worker by mmengine's worker_init_fn)."""
    metainfo = dict(classes=('toy',))

    def __init__(self, n: int = 48, noise: float = 0.0, seed: int = 0):
        g = np.random.default_rng(seed)
        self.x = g.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.5).astype(np.float32)
        self.noise = noise

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.noise:
            x = x + np.random.normal(0, self.noise, size=4).astype(np.float32)
        return dict(inputs=torch.from_numpy(np.ascontiguousarray(x)),
                    data_samples=torch.tensor(self.y[i]))


@MODELS.register_module(name='RobustnessToyModel', force=True)
class ToyModel(BaseModel):
    """Linear regression. ``nan_at``: the loss of that (1-based) training call is NaN;
    ``inf_grad_at``: that call has a finite loss but an infinite gradient."""

    def __init__(self, nan_at: int = -1, inf_grad_at: int = -1):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.nan_at, self.inf_grad_at = nan_at, inf_grad_at
        self.calls = 0

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = torch.stack(inputs)
        pred = self.linear(x).squeeze(-1)
        if mode == 'loss':
            self.calls += 1
            loss = ((pred - torch.stack(data_samples)) ** 2).mean()
            if self.calls == self.nan_at:
                loss = loss * float('nan')
            if self.calls == self.inf_grad_at:
                s = self.linear.weight.sum()
                loss = loss + torch.sqrt(s - s.detach())  # sqrt(0) = 0, d/ds = inf
            return dict(loss=loss)
        if mode == 'predict':
            return [dict(pred=p, gt=t) for p, t in zip(pred.detach(), data_samples)]
        return pred


@METRICS.register_module(name='RobustnessToyMetric', force=True)
class ToyMetric(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [float((d['pred'] - d['gt']) ** 2) for d in data_samples]

    def compute_metrics(self, results):
        return dict(mse=float(np.mean(results)))


@HOOKS.register_module(name='RobustnessRecordHook', force=True)
class RecordHook(Hook):
    """Appends every validation result, with the iteration, to work_dir/metrics.jsonl."""
    priority = 'LOWEST'

    def after_val_epoch(self, runner, metrics=None):
        with open(osp.join(runner.work_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(dict(epoch=runner.epoch, iter=runner.iter,
                                    metrics={k: float(v) for k, v in metrics.items()})) + '\n')


@HOOKS.register_module(name='RobustnessPauseHook', force=True)
class PauseHook(Hook):
    """After iteration ``at`` (and its checkpoint), signal readiness and wait to be killed."""
    priority = 'LOWEST'

    def __init__(self, at: int):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.at:
            with open(osp.join(runner.work_dir, 'ready'), 'w') as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(1)


def runner_cfg(work_dir, *, name, max_epochs=2, ckpt=None, custom_hooks=(), model=None,
               loop='ResumableEpochBasedTrainLoop', noise=0.0, num_workers=0, n=32,
               batch_size=4, optimizer=None, dataset=None, resume=False):
    return dict(
        work_dir=str(work_dir),
        experiment_name=name,
        default_scope='mmdet',
        model=model or dict(type='RobustnessToyModel'),
        train_dataloader=dict(
            dataset=dataset or dict(type='RobustnessToyDataset', n=n, noise=noise),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=batch_size, num_workers=num_workers,
            persistent_workers=False),
        val_dataloader=dict(dataset=dict(type='RobustnessToyDataset', n=16, seed=1),
                            sampler=dict(type='DefaultSampler', shuffle=False),
                            batch_size=8, num_workers=0),
        val_evaluator=dict(type='RobustnessToyMetric'),
        train_cfg=dict(type=loop, max_epochs=max_epochs, val_interval=1),
        val_cfg=dict(type='ValLoop'),
        optim_wrapper=dict(optimizer=optimizer or dict(type='AdamW', lr=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                              end=5),
                         dict(type='MultiStepLR', by_epoch=True, milestones=[2], gamma=0.1)],
        default_hooks=dict(
            checkpoint=ckpt or dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(custom_hooks),
        randomness=dict(seed=0, deterministic=True),
        resume=resume,
        env_cfg=dict(mp_cfg=dict(mp_start_method='fork')),
        log_level='INFO')


def read_log(work_dir) -> str:
    return '\n'.join(open(p).read() for p in sorted(glob.glob(osp.join(work_dir, '*', '*.log'))))


def finite_state(path) -> bool:
    sd = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    return all(torch.isfinite(v).all() for v in sd.values())


# -- NaN / inf ----------------------------------------------------------------------------
def _nan_runner(tmp_path, name, with_hook=True, ckpt=None, **model):
    hooks = [dict(type='NonFiniteLossHook')] if with_hook else []
    cfg = runner_cfg(tmp_path / name, name=f'{name}_{os.getpid()}', max_epochs=3,
                     model=dict(type='RobustnessToyModel', **model),
                     ckpt=ckpt or dict(type='CheckpointHook', interval=2, by_epoch=False,
                                       max_keep_ckpts=1),
                     custom_hooks=hooks)
    return Runner.from_cfg(cfg)


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    runner = _nan_runner(tmp_path, 'nan', nan_at=10)  # 8 iterations per epoch
    with pytest.raises(NonFiniteLossError) as e:
        runner.train()
    msg = str(e.value)
    assert 'iteration 10 (epoch 2, batch 2/8)' in msg and 'loss=nan' in msg
    work = str(tmp_path / 'nan')
    last = osp.join(work, 'iter_8.pth')
    assert last in msg  # the message names the checkpoint to resume from
    assert sorted(os.listdir(work)).count('iter_8.pth') == 1
    assert not osp.exists(osp.join(work, 'iter_10.pth'))  # the bad state was not written
    assert open(osp.join(work, 'last_checkpoint')).read().strip() == last
    assert finite_state(last)
    assert 'Non-finite loss (loss=nan) at iteration 10' in read_log(work)  # in the log file
    # without the hook (the control): mmengine writes the NaN state and deletes iter_8
    runner = _nan_runner(tmp_path, 'nan_nohook', with_hook=False, nan_at=10)
    runner.train()
    work = str(tmp_path / 'nan_nohook')
    assert not osp.exists(osp.join(work, 'iter_8.pth'))
    assert not finite_state(osp.join(work, 'iter_24.pth'))


def test_inf_loss_is_caught_too(tmp_path):
    runner = _nan_runner(tmp_path, 'inf', inf_grad_at=7)
    # iteration 7: finite loss, the weights become -inf; iteration 8 (a checkpoint iteration)
    # has a non-finite loss computed from them
    with pytest.raises(NonFiniteLossError, match=r'iteration 8 \(epoch 1, batch 8/8\)'):
        runner.train()
    assert finite_state(tmp_path / 'inf' / 'iter_6.pth')
    assert not osp.exists(tmp_path / 'inf' / 'iter_8.pth')


def test_non_finite_weights_with_finite_loss_are_not_saved(tmp_path):
    runner = _nan_runner(tmp_path, 'grad', inf_grad_at=6)  # iteration 6 saves a checkpoint
    with pytest.raises(NonFiniteLossError,
                       match=r'Non-finite model weights \(linear.weight\).*iteration 6'):
        runner.train()
    work = tmp_path / 'grad'
    assert not osp.exists(work / 'iter_6.pth')
    assert osp.exists(work / 'iter_4.pth') and finite_state(work / 'iter_4.pth')
    assert open(work / 'last_checkpoint').read().strip().endswith('iter_4.pth')


def test_non_finite_weights_are_not_saved_at_epoch_end(tmp_path):
    ckpt = dict(type='CheckpointHook', interval=1, by_epoch=True)
    runner = _nan_runner(tmp_path, 'epoch', ckpt=ckpt, inf_grad_at=16)  # last of epoch 2
    with pytest.raises(NonFiniteLossError,
                       match=r'weights \(linear.weight\).*the end of epoch 2 \(iteration 16\)'):
        runner.train()
    work = tmp_path / 'epoch'
    assert finite_state(work / 'epoch_1.pth') and not osp.exists(work / 'epoch_2.pth')
    assert open(work / 'last_checkpoint').read().strip().endswith('epoch_1.pth')


# -- skipped images reach the training log ------------------------------------------------
def test_skipped_images_reach_the_training_log(tmp_path):
    import cv2
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    img_dir = tmp_path / 'img'
    img_dir.mkdir()
    images, anns = [], []
    good = cv2.imencode('.png', np.full((24, 32, 3), 128, np.uint8))[1].tobytes()
    for i in range(12):
        name = f'bad{i}.png' if i in (3, 7) else f'good{i}.png'
        (img_dir / name).write_bytes(good[:30] if 'bad' in name else good)
        images.append(dict(id=i, file_name=name, width=32, height=24))
        anns.append(dict(id=i + 1, image_id=i, category_id=1, bbox=[2, 2, 10, 10], area=100))
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps(dict(images=images, annotations=anns,
                                   categories=[dict(id=1, name='thing')])))

    @MODELS.register_module(name='RobustnessImageToy', force=True)
    class ImageToy(BaseModel):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, inputs, data_samples=None, mode='tensor'):
            x = torch.stack([i.float().mean() for i in inputs])
            return dict(loss=((self.w * x - 1.0) ** 2).mean())

    dataset = dict(type='SafeCocoDataset', ann_file=str(ann), metainfo=dict(classes=('thing',)),
                   data_prefix=dict(img=str(img_dir) + '/'),
                   pipeline=[dict(type='RobustLoadImageFromFile'),
                             dict(type='LoadAnnotations', with_bbox=True),
                             dict(type='PackDetInputs')])
    cfg = runner_cfg(tmp_path / 'skip', name=f'skip_{os.getpid()}', max_epochs=2,
                     model=dict(type='RobustnessImageToy'), dataset=dataset, num_workers=2,
                     custom_hooks=[dict(type='SkippedImagesHook')])
    cfg.update(val_dataloader=None, val_evaluator=None, val_cfg=None)
    Runner.from_cfg(cfg).train()
    log = read_log(str(tmp_path / 'skip'))
    assert 'skipped_images: ' in log  # in every iteration line, counted across workers
    counts = [int(s.split()[0]) for s in log.split('skipped_images: ')[1:]]
    assert counts == sorted(counts) and counts[-1] >= 4  # two bad files, two epochs
    assert 'epoch 1:' in log and 'training image(s) skipped' in log
    assert 'bad3.png' in log and 'bad7.png' in log
    scalars = open(glob.glob(str(tmp_path / 'skip' / '*' / 'vis_data' / 'scalars.json'))[0]).read()
    assert 'skipped_images' in scalars


# -- resume from a mid-epoch checkpoint, in process ----------------------------------------
@pytest.mark.parametrize('plain_checkpoint', [False, True])
def test_resume_from_mid_epoch_checkpoint_in_process(tmp_path, plain_checkpoint):
    """8 iterations per epoch, checkpoints every 3: resuming from iter_9.pth (epoch 2, after
    its first batch) ends where the uninterrupted run ended.  ``plain_checkpoint``: the
    checkpoint has no epoch-start record (as if written by mmengine's EpochBasedTrainLoop)."""
    ckpt = dict(type='CheckpointHook', interval=3, by_epoch=False)
    ref = Runner.from_cfg(runner_cfg(tmp_path / 'ref', name=f'ref{plain_checkpoint}_{os.getpid()}',
                                     ckpt=ckpt, max_epochs=2))
    ref.train()
    path = str(tmp_path / 'ref' / 'iter_9.pth')
    if plain_checkpoint:
        c = torch.load(path, map_location='cpu', weights_only=True)
        assert c['message_hub']['runtime_info'].pop('resumable_loop_epoch_start')
        path = str(tmp_path / 'plain_iter_9.pth')
        torch.save(c, path)
    cfg = runner_cfg(tmp_path / 'res', name=f'res{plain_checkpoint}_{os.getpid()}', ckpt=ckpt,
                     max_epochs=2, resume=True)
    cfg['load_from'] = path
    res = Runner.from_cfg(cfg)
    res.train()
    assert res.iter == ref.iter == 16
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), k


# -- SIGKILL mid-epoch and resume ---------------------------------------------------------
CHILD_EPOCHS, CHILD_N, CHILD_BATCH = 3, 48, 4  # 12 iterations per epoch
CKPT_INTERVAL, KILL_AFTER = 5, 18  # killed in epoch 2 (batch 6), last checkpoint iter_15


def child_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument('work_dir')
    p.add_argument('--loop', default='ResumableEpochBasedTrainLoop')
    p.add_argument('--pause-at', type=int, default=None)
    p.add_argument('--resume', action='store_true')
    args = p.parse_args(argv)
    hooks = [dict(type='NonFiniteLossHook'), dict(type='RobustnessRecordHook')]
    if args.pause_at:
        hooks.append(dict(type='RobustnessPauseHook', at=args.pause_at))
    cfg = runner_cfg(args.work_dir, name=f'child_{os.getpid()}', max_epochs=CHILD_EPOCHS,
                     loop=args.loop, noise=0.3, num_workers=2, n=CHILD_N,
                     batch_size=CHILD_BATCH, resume=args.resume,
                     ckpt=dict(type='CheckpointHook', interval=CKPT_INTERVAL, by_epoch=False),
                     custom_hooks=hooks)
    runner = Runner.from_cfg(cfg)
    runner.train()
    torch.save(dict(state_dict=runner.model.state_dict(), iter=runner.iter, epoch=runner.epoch),
               osp.join(args.work_dir, 'final.pth'))


def _spawn(log_path, *args):
    """Start a child run; its output goes to a file (orphaned dataloader workers of a killed
    child must not hold a pipe open)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    out = open(log_path, 'w')
    proc = subprocess.Popen([sys.executable, osp.abspath(__file__), *map(str, args)],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.log_path = log_path
    out.close()
    return proc


def _output(proc) -> str:
    with open(proc.log_path) as f:
        return f.read()


def _finish(proc, timeout=180):
    proc.wait(timeout=timeout)
    out = _output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _final(work):
    return torch.load(osp.join(work, 'final.pth'), map_location='cpu', weights_only=True)


def _metrics(work):
    with open(osp.join(work, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, killed, plain = (str(tmp_path / n) for n in ('full', 'killed', 'plain'))
    a = _spawn(tmp_path / 'full.out', full)
    b = _spawn(tmp_path / 'killed.out', killed, '--pause-at', KILL_AFTER)
    ready = osp.join(killed, 'ready')
    deadline = time.time() + 180
    while not osp.exists(ready):
        assert b.poll() is None, _output(b)[-4000:]
        assert time.time() < deadline, 'the child never reached the kill point'
        time.sleep(0.2)
    time.sleep(0.2)
    os.kill(b.pid, signal.SIGKILL)
    b.wait(timeout=60)
    assert b.returncode == -signal.SIGKILL
    last = open(osp.join(killed, 'last_checkpoint')).read().strip()
    assert last.endswith(f'iter_{KILL_AFTER // CKPT_INTERVAL * CKPT_INTERVAL}.pth')
    assert not osp.exists(osp.join(killed, 'final.pth'))
    shutil.copytree(killed, plain)
    with open(osp.join(plain, 'last_checkpoint'), 'w') as f:
        f.write(last.replace(killed, plain))

    resumed = _spawn(tmp_path / 'resumed.out', killed, '--resume')
    control = _spawn(tmp_path / 'control.out', plain, '--resume', '--loop', 'EpochBasedTrainLoop')
    _finish(a)
    out = _finish(resumed)
    _finish(control)
    assert 'resumed epoch: 1, iter: 15' in out
    assert 'skipping the 3 batch(es) of this epoch' in out

    ref, got, bad = _final(full), _final(killed), _final(plain)
    total = CHILD_EPOCHS * CHILD_N // CHILD_BATCH
    assert ref['iter'] == got['iter'] == total
    for k, v in ref['state_dict'].items():
        assert torch.equal(v, got['state_dict'][k]), k  # bit-identical weights
    assert _metrics(killed) == _metrics(full)  # every epoch's validation, identical
    # the control: mmengine's own loop re-trains the resumed epoch's first 3 batches
    assert bad['iter'] == total + 3
    assert not all(torch.equal(v, bad['state_dict'][k]) for k, v in ref['state_dict'].items())


if __name__ == '__main__':
    child_main(sys.argv[1:])
