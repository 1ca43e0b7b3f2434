"""``ResumableEpochBasedTrainLoop``: resuming from a mid-epoch checkpoint continues that epoch.

mmengine 0.10.7's ``EpochBasedTrainLoop`` restores ``epoch`` and ``iter`` from the
checkpoint but then iterates the resumed epoch's dataloader from its first batch: after a
mid-epoch (iteration-interval) checkpoint, the batches already trained are trained again and
the run ends ``iter % iters_per_epoch`` iterations later than an uninterrupted one, with
different weights.  (``IterBasedTrainLoop`` skips them; the epoch loop does not.)

This loop skips the batches of the resumed epoch that the checkpoint already contains (it
records each epoch's first iteration in the message hub, which checkpoints save).  They are
*loaded and discarded*, not skipped at the sampler:
the sampler order for an epoch is fixed by ``seed + epoch`` (``DefaultSampler``), and with
non-persistent workers the workers restart every epoch with the same seeds, so loading the
skipped batches also replays the random augmentations exactly.  The cost is the loading
time of those batches (no forward/backward).  Otherwise identical to ``EpochBasedTrainLoop``.
"""
from __future__ import annotations

import logging

from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop

from efficientvit_det.registry import LOOPS

__all__ = ['ResumableEpochBasedTrainLoop']


_EPOCH_START_KEY = 'resumable_loop_epoch_start'


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that resumes a mid-epoch checkpoint at the right batch.

    At the start of every epoch the loop records ``(epoch, first iteration)`` in the message
    hub, which every checkpoint saves; after a resume, the batches of the resumed epoch
    already trained are ``iter - first iteration``.  (A checkpoint written by mmengine's own
    loop has no record: then ``iter - epoch * len(dataloader)`` is used.)
    """

    def _batches_done_in_epoch(self) -> int:
        n = len(self.dataloader)
        info = self.runner.message_hub.get_info(_EPOCH_START_KEY)
        if isinstance(info, dict) and info.get('epoch') == self._epoch:
            done = self._iter - int(info['start_iter'])
        elif isinstance(info, dict):  # recorded for an earlier epoch: this one starts now
            done = 0
        else:
            done = self._iter - self._epoch * n
        if done < 0 or done > n:
            print_log(f'resume: iteration {self._iter} does not fall in epoch '
                      f'{self._epoch + 1} of {n} iterations (was the batch size or the '
                      'dataset changed?); the epoch is run from its first batch',
                      logger='current', level=logging.WARNING)
            return 0
        return done

    def run_epoch(self) -> None:
        """Iterate one epoch, skipping the batches a resumed checkpoint already trained."""
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        skip = self._batches_done_in_epoch()
        self.runner.message_hub.update_info(
            _EPOCH_START_KEY, dict(epoch=self._epoch, start_iter=self._iter - skip))
        if skip:
            print_log(f'resume: epoch {self._epoch + 1}: skipping the {skip} batch(es) of this '
                      f'epoch trained before the checkpoint (iteration {self._iter})',
                      logger='current', level=logging.INFO)
        if skip < len(self.dataloader):
            for idx, data_batch in enumerate(self.dataloader):
                if idx < skip:
                    continue
                self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1
