"""mmengine checkpoints load with weights_only=True; pickles that run code are refused."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import efficientvit_det  # noqa: F401  (installs the allow-list)
from efficientvit_det.checkpoint import UnsafeCheckpointError
from efficientvit_det.checkpoint.backbone import load_pretrained
from efficientvit_det.models.backbones.efficientvit import EfficientViT


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y=None, mode='loss'):
        out = self.lin(x).squeeze(-1)
        return dict(loss=((out - y) ** 2).mean()) if mode == 'loss' else out


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(x=torch.randn(4, generator=g), y=torch.tensor(float(i)))


def make_runner(work_dir, max_epochs, resume=False):
    """A Runner whose checkpoints hold everything a detector's do: optimizer, two
    schedulers (MultiStepLR pickles a Counter), message hub (HistoryBuffer, numpy)."""
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.05)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
                         dict(type='MultiStepLR', milestones=[1], by_epoch=True)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume, randomness=dict(seed=0))


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    make_runner(work_dir, 2).train()
    return work_dir


def test_runner_checkpoint_needs_the_allow_list(runner_checkpoint):
    """Plain torch >= 2.6 refuses it (so the fix is needed); with the package it loads."""
    path = runner_checkpoint / 'epoch_2.pth'
    code = f'import torch; torch.load({str(path)!r}, weights_only=True)'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert proc.returncode != 0 and 'HistoryBuffer' in proc.stderr
    ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    assert ckpt['meta']['epoch'] == 2


def test_load_checkpoint_through_mmengine(runner_checkpoint):
    model = ToyModel()
    ckpt = load_checkpoint(model, str(runner_checkpoint / 'epoch_2.pth'), map_location='cpu')
    torch.testing.assert_close(model.lin.weight, ckpt['state_dict']['lin.weight'])


def test_runner_resume(runner_checkpoint):
    runner = make_runner(runner_checkpoint, 3, resume=True)
    runner.train()
    assert runner.epoch == 3
    assert os.path.isfile(runner_checkpoint / 'epoch_3.pth')
    # the message hub's history continued from the resumed checkpoint
    hub = torch.load(runner_checkpoint / 'epoch_3.pth', weights_only=True)['message_hub']
    assert len(hub['log_scalars']['train/loss'].data[0]) == 6  # 2 iters x 3 epochs


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class ReachesAttribute:
    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match='system'):
        torch.load(path, weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ToyModel(), str(path), map_location='cpu')
    with pytest.raises(UnsafeCheckpointError, match='refused to load .*could run code'):
        load_pretrained(EfficientViT('m0'), str(path))
    assert not marker.exists()


@pytest.mark.parametrize('owner, name', [(np.ndarray, 'tofile'), (HistoryBuffer, '__init__'),
                                         (HistoryBuffer, 'register_statistics')])
def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path, owner, name):
    path = tmp_path / 'getattr.pth'
    torch.save({'x': ReachesAttribute(owner, name)}, path)
    with pytest.raises(pickle.UnpicklingError, match='refused'):
        torch.load(path, weights_only=True)
    torch.save({'x': ReachesAttribute(HistoryBuffer, 'mean')}, path)  # the allowed case
    assert torch.load(path, weights_only=True)['x'] is HistoryBuffer.mean
