"""Test-time augmentation for instance segmentation (Mask R-CNN).

mmdet 3.3's ``DetTTAModel`` merges the boxes of the augmented views (flip back, concatenate,
class-wise NMS) but refuses predictions with masks. :class:`DetTTAModelWithMasks` does the
same merge and keeps, for every box that survives the NMS, the mask its own view predicted,
flipped back like the box. The masks are already at the original image size (mmdet predicts
with ``rescale=True`` under TTA), so the views' masks line up pixel for pixel.
"""
from __future__ import annotations

from typing import List

import torch
from mmcv.ops import batched_nms
from mmdet.models.test_time_augs import DetTTAModel
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_flip
from mmengine.structures import InstanceData
from torch import Tensor

from efficientvit_det.registry import MODELS

__all__ = ['DetTTAModelWithMasks']


def _flip_masks(masks: Tensor, direction: str) -> Tensor:
    """(N, H, W) masks of a flipped view back to the original orientation."""
    dims = {'horizontal': [-1], 'vertical': [-2], 'diagonal': [-2, -1]}
    if direction not in dims:
        raise ValueError(f'unknown flip direction {direction!r}: expected one of {sorted(dims)}')
    return masks.flip(dims[direction])


@MODELS.register_module()
class DetTTAModelWithMasks(DetTTAModel):
    """mmdet's ``DetTTAModel`` that also carries ``pred_instances.masks`` through the merge.

    Config: the same as ``DetTTAModel`` (``tta_cfg=dict(nms=..., max_per_img=...)``). Views
    without masks (a box-only detector) are merged exactly as ``DetTTAModel`` does.
    """

    def _merge_single_sample(self, data_samples: List[DetDataSample]) -> DetDataSample:
        if data_samples[0].pred_instances.get('masks', None) is None:
            return super()._merge_single_sample(data_samples)
        bboxes, scores, labels, masks = [], [], [], []
        for sample in data_samples:
            pred, meta = sample.pred_instances, sample.metainfo
            box, mask = pred.bboxes, pred.masks
            if meta.get('flip', False):
                box = bbox_flip(box, meta['ori_shape'], meta['flip_direction'])
                mask = _flip_masks(mask, meta['flip_direction'])
            bboxes.append(box)
            scores.append(pred.scores)
            labels.append(pred.labels)
            masks.append(mask)
        bboxes, scores = torch.cat(bboxes), torch.cat(scores)
        labels, masks = torch.cat(labels), torch.cat(masks)
        merged = data_samples[0]
        if bboxes.numel() == 0:
            return merged
        dets, keep = batched_nms(bboxes, scores, labels, self.tta_cfg.nms)
        keep = keep[:self.tta_cfg.max_per_img]
        dets = dets[:self.tta_cfg.max_per_img]
        results = InstanceData()
        results.bboxes = dets[:, :-1].clone()
        results.scores = dets[:, -1].clone()
        results.labels = labels[keep]
        results.masks = masks[keep]
        merged.pred_instances = results
        return merged
