"""Pre- and post-processing around an exported graph, with mmdet's own code.

:func:`preprocess_images` prepares images exactly as ``model.test_step`` does (test pipeline +
``DetDataPreprocessor``); :func:`postprocess` turns raw head outputs (from onnxruntime) into
detections with the head's own ``predict_by_feat`` (anchors, decoding, NMS), so they equal
``model.predict``'s.
"""
from __future__ import annotations

import copy
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.registry import init_default_scope
from torch import Tensor, nn

from .onnx_export import HEAD_OUTPUT_GROUPS

__all__ = ['build_bbox_head', 'class_names', 'detections_entry', 'postprocess',
           'preprocess_images']


def build_bbox_head(cfg) -> nn.Module:
    """The dense head of ``cfg.model`` with its ``test_cfg``: all :func:`postprocess` needs
    (anchor generator, box coder, NMS settings; no weights are used)."""
    from mmdet.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    head_cfg = copy.deepcopy(cfg.model.bbox_head)
    head_cfg.update(train_cfg=None, test_cfg=copy.deepcopy(cfg.model.get('test_cfg')))
    return MODELS.build(head_cfg).eval()


def _group_outputs(outputs: Union[Mapping[str, Any], Sequence[Any]],
                   output_names: Optional[Sequence[str]]) -> List[List[Tensor]]:
    if not isinstance(outputs, Mapping):
        if output_names is None:
            raise ValueError('pass output_names with a sequence of outputs (or pass a dict)')
        outputs = dict(zip(output_names, outputs))
    groups: List[List[Tensor]] = []
    for prefix in HEAD_OUTPUT_GROUPS:
        level = []
        while f'{prefix}_{len(level)}' in outputs:
            v = outputs[f'{prefix}_{len(level)}']
            level.append(torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v)
        if not level:
            break
        groups.append(level)
    if len(groups) < 2:
        raise ValueError(f'need cls_score_* and bbox_pred_* outputs, got {sorted(outputs)}')
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f'groups have different level counts: {[len(g) for g in groups]}')
    return groups


@torch.no_grad()
def postprocess(outputs: Union[Mapping[str, Any], Sequence[Any]], batch_img_metas: Sequence[dict],
                bbox_head: nn.Module, *, output_names: Optional[Sequence[str]] = None,
                rescale: bool = True, cfg: Optional[dict] = None, with_nms: bool = True):
    """Raw head outputs (from onnxruntime) -> detections, with mmdet's own code.

    Args:
        outputs: ``{name: array}`` as :func:`run_session` returns, or a sequence of arrays
            in the exported order together with ``output_names``.
        batch_img_metas: one dict per image with at least ``img_shape`` (the resized image,
            before padding; boxes are clipped to it) and, with ``rescale``, ``scale_factor``
            (w_scale, h_scale) of the resize; e.g. ``[s.metainfo for s in data_samples]``
            from :func:`preprocess_images`.
        bbox_head: the detector's dense head with its ``test_cfg`` (``model.bbox_head`` or
            :func:`build_bbox_head`).
        rescale: map boxes back to the original image (as ``model.predict(rescale=True)``).
        cfg: overrides ``bbox_head.test_cfg`` (score_thr, nms, max_per_img, ...).

    Returns:
        one ``InstanceData`` per image with ``bboxes`` (x1, y1, x2, y2), ``scores``,
        ``labels``: ``bbox_head.predict_by_feat`` on the same tensors ``model.predict`` feeds it.
    """
    groups = _group_outputs(outputs, output_names)
    groups = [[t.float() for t in g] for g in groups]
    score_factors = groups[2] if len(groups) > 2 else None
    return bbox_head.predict_by_feat(groups[0], groups[1], score_factors=score_factors,
                                     batch_img_metas=list(batch_img_metas), cfg=cfg,
                                     rescale=rescale, with_nms=with_nms)


def preprocess_images(cfg, images: Sequence[Union[str, np.ndarray]],
                      data_preprocessor: Optional[nn.Module] = None):
    """Images -> ``(inputs, data_samples)`` exactly as ``model.test_step`` prepares them.

    Runs the config's test pipeline (minus annotation loading) and its ``DetDataPreprocessor``.
    ``images`` are file paths or BGR uint8 arrays (as ``mmcv.imread`` gives). Returns the NCHW
    float32 batch the ONNX graph takes and the data samples whose ``metainfo`` is the
    ``batch_img_metas`` :func:`postprocess` needs.
    """
    from mmcv.transforms import Compose
    from mmdet.registry import MODELS
    from mmdet.utils import get_test_pipeline_cfg
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    pipeline_cfg = [copy.deepcopy(t) for t in get_test_pipeline_cfg(cfg)
                    if 'LoadAnnotations' not in t['type']]
    datas = []
    for i, img in enumerate(images):
        steps = copy.deepcopy(pipeline_cfg)
        if isinstance(img, np.ndarray):
            steps[0] = dict(type='mmdet.LoadImageFromNDArray')
            item = dict(img=img, img_id=i)
        else:
            item = dict(img_path=str(img), img_id=i)
        datas.append(Compose(steps)(item))
    if data_preprocessor is None:
        data_preprocessor = MODELS.build(copy.deepcopy(cfg.model.data_preprocessor))
    batch = data_preprocessor(dict(inputs=[d['inputs'] for d in datas],
                                   data_samples=[d['data_samples'] for d in datas]), False)
    return batch['inputs'], batch['data_samples']


def detections_entry(image: str, width: int, height: int, bboxes: Sequence[Sequence[float]],
                     scores: Sequence[float], labels: Sequence[int], classes: Sequence[str],
                     score_thr: float) -> dict:
    """One image's entry of a ``detections.json`` (the format of tools/infer.py and
    tools/onnx_infer.py): boxes x1,y1,x2,y2 in original pixels, scores >= ``score_thr``."""
    dets = []
    for box, score, label in zip(bboxes, scores, labels):
        if float(score) < score_thr:
            continue
        label = int(label)
        dets.append({'bbox': [round(float(v), 2) for v in box], 'score': round(float(score), 4),
                     'label': label, 'class': classes[label] if label < len(classes) else str(label)})
    return dict(image=str(image), width=int(width), height=int(height), detections=dets)


def class_names(cfg, metadata: Mapping[str, Any]) -> List[str]:
    """Class names from an exported graph's metadata, else from the config's dataset."""
    if metadata.get('classes'):
        return list(metadata['classes'])
    dataset = cfg.test_dataloader.dataset
    if (dataset.get('metainfo') or {}).get('classes'):
        return list(dataset.metainfo['classes'])
    from mmdet.registry import DATASETS
    dataset_type = DATASETS.get(dataset.type)
    return list(getattr(dataset_type, 'METAINFO', {}).get('classes', ()))
