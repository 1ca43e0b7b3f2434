"""Progress lines of the tools, printed by hooks while mmengine's own console log is quiet.

``tools/train.py`` and ``tools/test.py`` keep mmengine's console at warnings (its INFO lines,
environment and config dumps go to the log file; ``--verbose`` shows them), so these hooks say
how far a run is: :class:`TrainProgressHook` one line per logging interval (iteration, loss,
lr, elapsed, ETA) and the validation metrics; :class:`EvalProgressHook` count, rate and ETA of
an evaluation (``tools/test.py``, with or without ``--tta``).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional, TextIO

from mmengine.hooks import Hook

from efficientvit_det.cli import Progress, format_duration, is_main_process

__all__ = ['TrainProgressHook', 'EvalProgressHook', 'format_metrics']


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``coco/bbox_mAP: 0.5900  coco/bbox_mAP_50: 0.8240 ...``, as mmengine logs them."""
    return '  '.join(f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}'
                     for k, v in metrics.items())


class TrainProgressHook(Hook):
    """``epoch 1/8  iter 50/2000  loss 1.565  lr 4.9e-04  elapsed 0:09  eta 5:37`` every
    ``interval`` iterations (and the last), then one line per validation."""

    priority = 'VERY_LOW'

    def __init__(self, interval: int = 50, stream: Optional[TextIO] = None) -> None:
        self.interval = max(int(interval), 1)
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        if is_main_process():
            print(text, file=self.stream, flush=True)

    def before_train(self, runner) -> None:
        self.t0 = time.monotonic()
        self.start_iter = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        it, total = runner.iter + 1, runner.max_iters
        if it % self.interval and it != total:
            return
        hub = runner.message_hub
        parts = [f'iter {it}/{total}']
        if hasattr(runner.train_loop, 'max_epochs'):
            parts.insert(0, f'epoch {runner.epoch + 1}/{runner.max_epochs}')
        if 'train/loss' in hub.log_scalars:
            parts.append(f'loss {hub.get_scalar("train/loss").mean(self.interval):.3f}')
        if 'train/lr' in hub.log_scalars:
            parts.append(f'lr {hub.get_scalar("train/lr").current():.1e}')
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(it - self.start_iter, 1) * (total - it)
        parts += [f'elapsed {format_duration(elapsed)}', f'eta {format_duration(eta)}']
        self._print('  ' + '  '.join(parts))

    def after_val_epoch(self, runner, metrics: Optional[Mapping[str, Any]] = None) -> None:
        if metrics:
            self._print(f'  validation (epoch {runner.epoch}): {format_metrics(metrics)}')


class EvalProgressHook(Hook):
    """Count, rate and ETA of the test loop's images (a line every ``interval`` seconds and
    one at the end)."""

    priority = 'VERY_LOW'

    def __init__(self, label: str = 'test', interval: float = 5.0,
                 stream: Optional[TextIO] = None) -> None:
        self.label = label
        self.interval = interval
        self.stream = stream or sys.stdout
        self.progress: Optional[Progress] = None

    def before_test_epoch(self, runner) -> None:
        if not is_main_process():
            return
        total = len(runner.test_dataloader.dataset)
        self.progress = Progress(total, 'images', self.label, self.interval, self.stream)

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.progress is not None:  # rank 0 counts for every rank (they share the set)
            n = len(outputs) if outputs is not None else 1
            self.progress.update(min(n * runner.world_size,
                                     self.progress.total - self.progress.count))

    def after_test_epoch(self, runner, metrics: Optional[Mapping[str, Any]] = None) -> None:
        if self.progress is not None:
            self.progress.done()
