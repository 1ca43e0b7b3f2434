"""Training hooks: stop on a non-finite loss without saving the bad state; log skipped images.

``NonFiniteLossHook``
    After every training iteration, before any other hook (``priority='VERY_HIGH'``, so
    before ``CheckpointHook``), it checks every loss the model returned.  A NaN or inf
    loss stops training with :class:`NonFiniteLossError`, naming the iteration (1-based, as
    in the log and in ``iter_N.pth``), the epoch and batch, the loss values, the images of
    the batch and the last good checkpoint.  The optimizer step of that iteration has
    already run, so the in-memory weights are bad; they are never saved: the hook raises
    before ``CheckpointHook`` can write (or, with ``max_keep_ckpts``, delete an older
    checkpoint to make room), and ``work_dir/last_checkpoint`` keeps pointing at the last
    good file.  A finite loss can still come with an inf gradient that makes the weights
    non-finite; so whenever a ``CheckpointHook`` is about to save (after this iteration or
    epoch), the hook also checks that every floating-point tensor of the model's state is
    finite, and stops naming the first bad tensor otherwise.  In distributed training the
    decision is all-reduced, so every rank stops at the same iteration.

``SkippedImagesHook``
    Reads the shared counters of every ``RobustLoadImageFromFile`` in the training
    pipeline: ``skipped_images`` (the total since this process started) appears in every
    training log line and in the scalar logs, and each epoch ends with a line giving the
    epoch's count and the names of the files.
"""
from __future__ import annotations

import inspect
import math
import os.path as osp
from typing import Dict, List, Optional

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper

from efficientvit_det.registry import HOOKS

__all__ = ['NonFiniteLossError', 'NonFiniteLossHook', 'SkippedImagesHook',
           'find_robust_loaders']


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss or weights; the message says where and what to do."""


def _last_good_checkpoint(runner) -> Optional[str]:
    """The checkpoint ``work_dir/last_checkpoint`` names (written only after a save)."""
    path = osp.join(runner.work_dir, 'last_checkpoint')
    if osp.isfile(path):
        with open(path) as f:
            name = f.read().strip()
        if name:
            return name
    return None


def _position(runner, batch_idx: Optional[int]) -> str:
    """Where training is, in the log's terms (1-based iteration, epoch, batch)."""
    from mmengine.runner import EpochBasedTrainLoop
    loop = runner.train_loop
    if batch_idx is None:  # after_train_epoch: runner.iter already counts the last iteration
        return f'the end of epoch {runner.epoch + 1} (iteration {runner.iter})'
    it = runner.iter + 1  # after_train_iter runs before the loop increments runner.iter
    if isinstance(loop, EpochBasedTrainLoop):
        return (f'iteration {it} (epoch {runner.epoch + 1}, batch {batch_idx + 1}/'
                f'{len(loop.dataloader)})')
    return f'iteration {it}'


def _batch_files(data_batch, limit: int = 8) -> List[str]:
    samples = data_batch.get('data_samples') if isinstance(data_batch, dict) else None
    files = []
    for s in samples or []:
        meta = getattr(s, 'metainfo', None)
        if isinstance(meta, dict) and meta.get('img_path'):
            files.append(str(meta['img_path']))
    return files[:limit]


def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if get_world_size() <= 1:
        return flag
    from mmengine.dist.utils import get_comm_device
    t = torch.tensor([1.0 if flag else 0.0], device=get_comm_device())
    all_reduce(t, op='max')
    return bool(t.item() > 0)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop training on a NaN/inf loss (or non-finite weights about to be saved).

    Args:
        check_state_before_save: also check the model's weights and buffers whenever a
            ``CheckpointHook`` is about to save (default True).
    """

    priority = 'VERY_HIGH'

    def __init__(self, check_state_before_save: bool = True) -> None:
        self.check_state_before_save = check_state_before_save

    # -- checks ----------------------------------------------------------------------
    @staticmethod
    def _non_finite_losses(outputs) -> Dict[str, float]:
        bad = {}
        if not isinstance(outputs, dict):
            return bad
        for key, value in outputs.items():
            if 'loss' not in key:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() == 0:
                    continue
                if not bool(torch.isfinite(value.detach()).all()):
                    v = value.detach().float()
                    bad[key] = float(v) if v.numel() == 1 else float('nan')
            elif isinstance(value, (int, float)) and not math.isfinite(value):
                bad[key] = float(value)
        return bad

    @staticmethod
    def _first_non_finite_tensor(runner) -> Optional[str]:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        tensors = [(k, t) for k, t in model.state_dict().items()
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if not tensors:
            return None
        ok = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
        if bool(ok.all()):
            return None
        return tensors[int((~ok).nonzero()[0])][0]

    @staticmethod
    def _checkpoint_hooks(runner) -> List[CheckpointHook]:
        return [h for h in runner.hooks if isinstance(h, CheckpointHook)]

    def _save_due_after_iter(self, runner) -> bool:
        for h in self._checkpoint_hooks(runner):
            if not h.by_epoch and (h.every_n_train_iters(runner, h.interval, h.save_begin)
                                   or (h.save_last and h.is_last_train_iter(runner))):
                return True
        return False

    def _save_due_after_epoch(self, runner) -> bool:
        for h in self._checkpoint_hooks(runner):
            if h.by_epoch and (h.every_n_epochs(runner, h.interval, h.save_begin)
                               or (h.save_last and h.is_last_train_epoch(runner))):
                return True
        return False

    # -- stopping --------------------------------------------------------------------
    def _stop(self, runner, what: str, batch_idx: Optional[int], data_batch=None) -> None:
        last = _last_good_checkpoint(runner)
        files = _batch_files(data_batch) if data_batch is not None else []
        msg = (f'{what} at {_position(runner, batch_idx)}: training stopped. '
               'The state after this iteration was not saved; ')
        if last:
            msg += (f'the last good checkpoint is {last}. Resume from it with '
                    f'`python tools/train.py CONFIG --resume {last}` ')
        else:
            msg += 'no checkpoint had been saved yet. Restart '
        msg += ('after lowering the learning rate, enabling gradient clipping '
                '(optim_wrapper.clip_grad=dict(max_norm=...)) or checking the data')
        if files:
            msg += f'; images of this batch: {files}'
        runner.logger.error(msg)
        raise NonFiniteLossError(msg)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        bad = self._non_finite_losses(outputs)
        if _any_rank(bool(bad)):
            if bad:
                values = ', '.join(f'{k}={v}' for k, v in bad.items())
                what = f'Non-finite loss ({values})'
            else:
                what = 'Non-finite loss on another rank'
            self._stop(runner, what, batch_idx, data_batch)
        if self.check_state_before_save and self._save_due_after_iter(runner):
            self._check_state(runner, batch_idx, data_batch)

    def after_train_epoch(self, runner) -> None:
        if self.check_state_before_save and self._save_due_after_epoch(runner):
            self._check_state(runner, None)

    def _check_state(self, runner, batch_idx: Optional[int], data_batch=None) -> None:
        name = self._first_non_finite_tensor(runner)
        if _any_rank(name is not None):
            self._stop(runner, f'Non-finite model weights ({name or "on another rank"}) with '
                       'a finite loss, found before saving a checkpoint', batch_idx,
                       data_batch)


def find_robust_loaders(dataset) -> list:
    """Every ``RobustLoadImageFromFile`` in a dataset's pipeline(s), through wrappers."""
    from efficientvit_det.datasets.robust_loading import RobustLoadImageFromFile
    found, seen = [], set()

    def visit(obj, depth=0):
        if obj is None or id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        if isinstance(obj, RobustLoadImageFromFile):
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
            return
        for attr in ('pipeline', 'transforms', 'transform', 'dataset', 'datasets'):
            child = getattr(obj, attr, None)
            if child is None or inspect.isroutine(child) or isinstance(child, (str, bytes)):
                continue
            visit(child, depth + 1)

    visit(dataset)
    return found


@HOOKS.register_module()
class SkippedImagesHook(Hook):
    """Log how many training images ``RobustLoadImageFromFile`` skipped, and which."""

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL) writes the iteration's line

    def __init__(self) -> None:
        self._loaders: Optional[list] = None
        self._epoch_start: list = []

    def _total(self) -> int:
        return sum(t.num_skipped for t in self._loaders or [])

    def before_train(self, runner) -> None:
        self._loaders = find_robust_loaders(runner.train_dataloader.dataset)
        if not self._loaders:
            runner.logger.warning(
                'SkippedImagesHook: the training pipeline has no RobustLoadImageFromFile; '
                'there are no skipped images to count')

    def before_train_epoch(self, runner) -> None:
        self._epoch_start = [(t.num_skipped, t.recorder.snapshot())
                             for t in self._loaders or []]

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._loaders:
            runner.message_hub.update_scalar('train/skipped_images', self._total())

    def after_train_epoch(self, runner) -> None:
        if not self._loaders:
            return
        total = self._total()
        n, names = 0, []
        for t, (start, snap) in zip(self._loaders, self._epoch_start):
            n += t.num_skipped - start
            names += t.recorder.recent(snap)
        if get_world_size() > 1:
            from mmengine.dist.utils import get_comm_device
            counts = torch.tensor([float(n), float(total)], device=get_comm_device())
            all_reduce(counts, op='sum')
            n, total = int(counts[0].item()), int(counts[1].item())
        if n:
            runner.logger.warning(
                f'epoch {runner.epoch + 1}: {n} training image(s) skipped because they could '
                f'not be loaded ({total} since this run started); the last ones: {names}')
        else:
            runner.logger.info(f'epoch {runner.epoch + 1}: no training image skipped '
                               f'({total} since this run started)')
