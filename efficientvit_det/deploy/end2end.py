"""End-to-end ONNX graph of a RetinaNet-style detector: image in, ``boxes, scores, labels`` out.

:class:`DetectorEnd2End` is the detector's forward (backbone, neck, head convolutions) followed
by mmdet's RetinaNet post-processing written with graph-friendly ops, so the exported file runs
in onnxruntime alone, with no mmdet, mmcv or torch (``tools/onnx_detect_standalone.py``):

1. anchors of every level from the feature-map size (``Range``: dynamic image size), the head's
   own base anchors and strides;
2. ``sigmoid`` scores; per level the ``nms_pre`` best (anchor, class) pairs above ``score_thr``
   (``TopK`` on the scores padded with ``nms_pre`` values of -1, then a ``> score_thr`` mask:
   the same set as mmdet's ``filter_scores_and_topk``, which thresholds first);
3. ``DeltaXYWHBBoxCoder`` decoding (means/stds, ``wh_ratio_clip``), clipping to the resized
   image, division by the resize scale (boxes in original-image pixels), the
   ``min_bbox_size`` filter;
4. class-aware NMS as mmcv's ``batched_nms`` does it (every box shifted by
   ``label * (max coordinate + 1)``, one ONNX ``NonMaxSuppression``), the ``max_per_img`` best.

Inputs: ``input`` (1, 3, H, W) float32, the image after the test pipeline and the
``DetDataPreprocessor`` (as the raw graph of :func:`export_onnx`; H, W dynamic, batch 1);
``img_shape`` (2,) float32: (height, width) of the resized image before padding (boxes are
clipped to it); ``scale_factor`` (2,) float32: (w_scale, h_scale) of the resize. Outputs:
``boxes`` (K, 4) float32 x1, y1, x2, y2 in original-image pixels, ``scores`` (K,) float32,
``labels`` (K,) int64, sorted by score, K <= ``max_per_img``.

The preprocessing parameters (resize scale, mean, std, channel order, padding) are stored in
the file's metadata (``efficientvit_det.preprocess``), so a caller needs nothing else.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

# imported here, not inside the traced forward: torchvision's first import calls an op that
# the ONNX tracer cannot record
from torchvision.ops import nms as _torchvision_nms

__all__ = ['END2END_INPUTS', 'END2END_OUTPUTS', 'DetectorEnd2End', 'preprocess_spec',
           'export_end2end', 'verify_end2end', 'compare_detections', 'run_end2end',
           'synthetic_image']

END2END_INPUTS = ('input', 'img_shape', 'scale_factor')
END2END_OUTPUTS = ('boxes', 'scores', 'labels')


class _NMS(torch.autograd.Function):
    """Single-class NMS: kept indices, best first, at most ``max_output``.

    Eager: ``torchvision.ops.nms`` (suppresses IoU > threshold, as mmcv's ``nms``); exported as
    one ONNX ``NonMaxSuppression`` (same rule, output sorted by score).
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float,
                max_output: int) -> Tensor:
        return _torchvision_nms(boxes, scores, iou_threshold)[:max_output]

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, max_output: int):
        zero = g.op('Constant', value_t=torch.tensor([0], dtype=torch.long))
        boxes3 = g.op('Unsqueeze', boxes, zero)                         # (1, N, 4)
        scores3 = g.op('Unsqueeze', g.op('Unsqueeze', scores, zero), zero)  # (1, 1, N)
        selected = g.op('NonMaxSuppression', boxes3, scores3,
                        g.op('Constant', value_t=torch.tensor([max_output], dtype=torch.long)),
                        g.op('Constant', value_t=torch.tensor([iou_threshold],
                                                              dtype=torch.float)))
        return g.op('Gather', selected, g.op('Constant', value_t=torch.tensor(2)), axis_i=1)


def _check_supported(detector: nn.Module) -> None:
    head = getattr(detector, 'bbox_head', None)
    if head is None or not hasattr(detector, 'extract_feat'):
        raise TypeError(f'{type(detector).__name__}: the end-to-end graph needs a single-stage '
                        'detector with a bbox_head (RetinaNet); export the raw graph instead')
    problems = []
    if type(getattr(head, 'prior_generator', None)).__name__ != 'AnchorGenerator':
        problems.append('an AnchorGenerator prior generator')
    coder = getattr(head, 'bbox_coder', None)
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        problems.append('a DeltaXYWHBBoxCoder')
    elif coder.add_ctr_clamp or not coder.clip_border:
        problems.append('DeltaXYWHBBoxCoder with add_ctr_clamp=False, clip_border=True')
    if not getattr(head, 'use_sigmoid_cls', False):
        problems.append('sigmoid classification (use_sigmoid=True)')
    if getattr(head, 'test_cfg', None) is None or 'nms' not in head.test_cfg:
        problems.append("a test_cfg with 'nms'")
    elif head.test_cfg.nms.get('type', 'nms') != 'nms':
        problems.append("test_cfg.nms.type 'nms'")
    if problems:
        raise TypeError(f'{type(head).__name__}: the end-to-end graph supports RetinaNet-style '
                        f'heads; this one lacks {", ".join(problems)}. Export the raw graph '
                        '(without --end2end) and post-process with efficientvit_det.deploy.'
                        'postprocess')


class DetectorEnd2End(nn.Module):
    """A RetinaNet-style detector with its post-processing: see the module docstring.

    The post-processing settings come from ``detector.bbox_head.test_cfg`` (``score_thr``,
    ``nms_pre``, ``nms.iou_threshold``, ``max_per_img``, ``min_bbox_size``).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        _check_supported(detector)
        self.detector = detector
        head = detector.bbox_head
        cfg = head.test_cfg
        self.num_classes = int(head.cls_out_channels)
        self.score_thr = float(cfg.get('score_thr', 0.))
        self.nms_pre = int(cfg.get('nms_pre', -1))
        self.iou_thr = float(cfg.nms.iou_threshold)
        self.max_per_img = int(cfg.get('max_per_img', 100))
        self.min_bbox_size = float(cfg.get('min_bbox_size', -1))
        if self.nms_pre <= 0 or self.score_thr < 0 or self.max_per_img <= 0:
            raise ValueError(f'test_cfg: need nms_pre > 0, score_thr >= 0, max_per_img > 0 '
                             f'(got {self.nms_pre}, {self.score_thr}, {self.max_per_img})')
        if cfg.nms.get('class_agnostic', False):
            raise ValueError('test_cfg.nms.class_agnostic=True is not supported')
        gen = head.prior_generator
        self.strides: List[Tuple[float, float]] = [(float(s[0]), float(s[1])) for s in gen.strides]
        for lvl, anchors in enumerate(gen.base_anchors):
            self.register_buffer(f'base_anchors_{lvl}', anchors.clone().float(), persistent=False)
        coder = head.bbox_coder
        self.register_buffer('means', torch.tensor(coder.means, dtype=torch.float32),
                             persistent=False)
        self.register_buffer('stds', torch.tensor(coder.stds, dtype=torch.float32),
                             persistent=False)
        self.max_ratio = float(abs(math.log(16 / 1000)))  # the coder's default wh_ratio_clip

    def _anchors(self, lvl: int, height, width) -> Tensor:
        """mmdet's ``AnchorGenerator.single_level_grid_priors`` (rows y, then x, then anchor)."""
        base = getattr(self, f'base_anchors_{lvl}')
        stride_w, stride_h = self.strides[lvl]
        shift_x = torch.arange(width, device=base.device).to(base.dtype) * stride_w
        shift_y = torch.arange(height, device=base.device).to(base.dtype) * stride_h
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)

    def _level_candidates(self, lvl: int, cls_score: Tensor, bbox_pred: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(scores, labels, deltas, anchors) of one level's best ``nms_pre`` pairs > score_thr."""
        num_classes = self.num_classes
        scores = cls_score[0].permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
        anchors = self._anchors(lvl, cls_score.shape[2], cls_score.shape[3])
        # padding makes TopK's k a constant and is never kept (score -1 <= score_thr)
        padded = torch.cat([scores, scores.new_full((self.nms_pre,), -1.)])
        top, idx = padded.topk(self.nms_pre)
        keep = torch.nonzero(top > self.score_thr).reshape(-1)
        top, idx = top[keep], idx[keep]
        anchor_idx = torch.div(idx, num_classes, rounding_mode='floor')
        return top, idx % num_classes, deltas[anchor_idx], anchors[anchor_idx]

    def _decode(self, anchors: Tensor, deltas: Tensor, img_shape: Tensor) -> Tensor:
        """mmdet's ``delta2bbox`` (no centre clamp), clipped to ``img_shape`` (h, w)."""
        deltas = deltas * self.stds + self.means
        pxy = (anchors[:, :2] + anchors[:, 2:]) * 0.5
        pwh = anchors[:, 2:] - anchors[:, :2]
        dwh = deltas[:, 2:].clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * deltas[:, :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        upper = torch.stack([img_shape[1], img_shape[0], img_shape[1], img_shape[0]])
        return torch.minimum(boxes.clamp(min=0), upper)

    def forward(self, inputs: Tensor, img_shape: Tensor, scale_factor: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
        cls_scores, bbox_preds = self.detector.bbox_head(self.detector.extract_feat(inputs))[:2]
        parts = [self._level_candidates(lvl, c.float(), b.float())
                 for lvl, (c, b) in enumerate(zip(cls_scores, bbox_preds))]
        scores = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        boxes = self._decode(torch.cat([p[3] for p in parts]), torch.cat([p[2] for p in parts]),
                             img_shape.float())
        boxes = boxes * (1. / scale_factor.float()).repeat(2)
        if self.min_bbox_size >= 0:
            wh = boxes[:, 2:] - boxes[:, :2]
            valid = torch.nonzero((wh[:, 0] > self.min_bbox_size)
                                  & (wh[:, 1] > self.min_bbox_size)).reshape(-1)
            boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        # mmcv's batched_nms: classes apart by label * (max coordinate + 1); the 0 keeps the
        # max defined for zero boxes (boxes are clipped at 0, so it never changes the max)
        max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
        shifted = boxes + (labels.to(boxes.dtype) * (max_coordinate + 1))[:, None]
        keep = _NMS.apply(shifted, scores, self.iou_thr, self.max_per_img)
        return boxes[keep], scores[keep], labels[keep]


# --------------------------------------------------------------------------------------------
# preprocessing parameters (stored in the graph's metadata for onnxruntime-only callers)
# --------------------------------------------------------------------------------------------
_LOADERS = ('LoadImageFromFile', 'RobustLoadImageFromFile', 'LoadImageFromNDArray')
_IGNORED = ('LoadAnnotations', 'PackDetInputs')


def preprocess_spec(cfg) -> Dict[str, Any]:
    """The test pipeline + ``DetDataPreprocessor`` of ``cfg`` as plain numbers.

    ``{'resize': {'scale': [w, h], 'keep_ratio': bool, 'interpolation': 'bilinear'},
    'mean': [...], 'std': [...], 'bgr_to_rgb': bool, 'pad_size_divisor': int,
    'pad_value': float}``: what ``tools/onnx_detect_standalone.py`` reproduces with OpenCV
    and numpy. Raises ``ValueError`` for pipelines it cannot describe (other transforms).
    """
    from mmdet.utils import get_test_pipeline_cfg
    resize = None
    for t in get_test_pipeline_cfg(cfg):
        kind = str(t['type']).split('.')[-1]
        if kind in _LOADERS:
            if t.get('color_type', 'color') != 'color' or t.get('to_float32', False):
                raise ValueError(f'{kind}: only color_type="color", to_float32=False')
        elif kind == 'Resize':
            if t.get('scale') is None or t.get('scale_factor') is not None:
                raise ValueError('Resize: only a fixed scale=(w, h) is supported')
            if t.get('backend', 'cv2') != 'cv2':
                raise ValueError('Resize: only the cv2 backend is supported')
            scale = t['scale']
            scale = [int(scale), int(scale)] if isinstance(scale, (int, float)) else \
                [int(s) for s in scale]
            resize = dict(scale=scale, keep_ratio=bool(t.get('keep_ratio', False)),
                          interpolation=str(t.get('interpolation', 'bilinear')))
        elif kind not in _IGNORED:
            raise ValueError(f'test pipeline transform {kind} has no standalone equivalent '
                             f'(supported: {", ".join(_LOADERS + ("Resize",) + _IGNORED)})')
    pre = cfg.model.data_preprocessor
    kind = str(pre.get('type', '')).split('.')[-1]
    if kind != 'DetDataPreprocessor' or pre.get('batch_augments'):
        raise ValueError(f'data_preprocessor {kind}: only DetDataPreprocessor without '
                         'batch_augments is supported')
    return dict(resize=resize, mean=[float(v) for v in pre.get('mean') or (0., 0., 0.)],
                std=[float(v) for v in pre.get('std') or (1., 1., 1.)],
                bgr_to_rgb=bool(pre.get('bgr_to_rgb', False) or pre.get('rgb_to_bgr', False)),
                pad_size_divisor=int(pre.get('pad_size_divisor', 1)),
                pad_value=float(pre.get('pad_value', 0)))


# --------------------------------------------------------------------------------------------
# export, running and verification
# --------------------------------------------------------------------------------------------
def _meta_tensors(meta: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    img_shape = torch.tensor([float(v) for v in meta['img_shape'][:2]], dtype=torch.float32)
    scale = torch.tensor([float(v) for v in meta['scale_factor'][:2]], dtype=torch.float32)
    return img_shape, scale


def run_end2end(session, inputs, img_shape, scale_factor) -> Tuple[np.ndarray, ...]:
    """``(boxes, scores, labels)`` of an end-to-end graph for one preprocessed image."""
    feed = {'input': np.ascontiguousarray(np.asarray(inputs, dtype=np.float32)),
            'img_shape': np.asarray(img_shape, dtype=np.float32).reshape(2),
            'scale_factor': np.asarray(scale_factor, dtype=np.float32).reshape(2)}
    return tuple(session.run(list(END2END_OUTPUTS), feed))


def synthetic_image(hw: Sequence[int], seed: int = 0) -> np.ndarray:
    """A smooth random BGR uint8 image (upsampled noise: no two anchors see equal pixels)."""
    import cv2
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (hw[0] // 8 + 1, hw[1] // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_CUBIC)


def compare_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, expected,
                       rel_tol: float = 1e-3, what: str = 'onnxruntime') -> Dict[str, Any]:
    """One-to-one match of (boxes, scores, labels) with an mmdet ``InstanceData``.

    Every detection must have an unused expected one with the same label, every box coordinate
    within ``rel_tol * max(1, max |expected box|)`` and the score within ``rel_tol``. Raises
    ``AssertionError`` naming the first mismatch; returns the counts and worst errors.
    """
    eb = expected.bboxes.detach().float().cpu().numpy()
    es = expected.scores.detach().float().cpu().numpy()
    el = expected.labels.detach().cpu().numpy()
    boxes, scores, labels = (np.asarray(boxes, np.float32), np.asarray(scores, np.float32),
                             np.asarray(labels))
    if len(boxes) != len(eb):
        raise AssertionError(f'{what}: {len(boxes)} detections, mmdet gives {len(eb)}')
    used = np.zeros(len(eb), bool)
    worst_box = worst_score = 0.
    for b, s, lab in zip(boxes, scores, labels):
        box_err = np.abs(eb - b).max(1) / np.maximum(1., np.abs(eb).max(1))
        score_err = np.abs(es - s)
        ok = (~used) & (el == lab) & (box_err <= rel_tol) & (score_err <= rel_tol)
        if not ok.any():
            raise AssertionError(f'{what}: detection {b.tolist()} score {s:.5f} label {lab} has '
                                 f'no mmdet match within {rel_tol}')
        j = int(np.flatnonzero(ok)[np.argmin(box_err[ok])])
        used[j] = True
        worst_box, worst_score = max(worst_box, float(box_err[j])), max(worst_score,
                                                                       float(score_err[j]))
    return dict(num_dets=len(boxes), max_box_rel_err=worst_box, max_score_abs_err=worst_score,
                labels_equal=True)


@torch.no_grad()
def verify_end2end(onnx_file: str, model: nn.Module, cfg, images: Sequence[Any],
                   rel_tol: float = 1e-3, session=None) -> List[Dict[str, Any]]:
    """onnxruntime's end-to-end detections vs ``model.predict`` (mmdet) on each image.

    ``images``: file paths or BGR uint8 arrays; each goes through mmdet's test pipeline and
    data preprocessor (:func:`preprocess_images`) for both. Raises ``AssertionError`` on a
    mismatch (see :func:`compare_detections`); returns per-image reports.
    """
    from .onnx_export import make_session
    from .postprocess import preprocess_images
    session = session or make_session(onnx_file)
    reports = []
    for i, img in enumerate(images):
        inputs, samples = preprocess_images(cfg, [img], model.data_preprocessor)
        expected = model.predict(inputs, samples, rescale=True)[0].pred_instances
        img_shape, scale = _meta_tensors(samples[0].metainfo)
        got = run_end2end(session, inputs.numpy(), img_shape.numpy(), scale.numpy())
        shape = 'x'.join(map(str, inputs.shape))
        report = compare_detections(*got, expected, rel_tol,
                                    what=f'{onnx_file} at input {shape} (image {i})')
        report.update(input_shape=shape, rel_tol=rel_tol)
        reports.append(report)
    return reports


def export_end2end(model: nn.Module, out_file: str, cfg, *, shape: Sequence[int] = (800, 1344),
                   opset: int = 17, verify_images: Optional[Sequence[Any]] = None,
                   rel_tol: float = 1e-3, metadata: Optional[Dict[str, Any]] = None,
                   seed: int = 0) -> Dict[str, Any]:
    """Export ``model`` (deploy mode, eval) with its post-processing to ``out_file``.

    Traced at a (1, 3, *shape) input; height and width are dynamic, batch is 1. ``cfg`` gives
    the preprocessing stored in the metadata (:func:`preprocess_spec`; ``None`` in the
    metadata when the pipeline has no standalone equivalent). ``verify_images``: images on
    which onnxruntime must match ``model.predict`` (:func:`verify_end2end`); ``None`` = two
    synthetic images whose network inputs are ``shape`` and a different size; ``()`` skips.
    Returns a summary dict (path, names, verification reports).
    """
    from .onnx_export import write_checked_onnx
    if opset < 11:
        raise ValueError(f'opset {opset}: the end-to-end graph needs opset >= 11 '
                         '(NonMaxSuppression, TopK with a k input)')
    module = DetectorEnd2End(model).eval()
    h, w = int(shape[0]), int(shape[1])
    g = torch.Generator().manual_seed(seed)
    example = (torch.randn(1, 3, h, w, generator=g), torch.tensor([float(h), float(w)]),
               torch.tensor([1., 1.]))
    try:
        spec: Optional[Dict[str, Any]] = preprocess_spec(cfg)
    except ValueError:
        spec = None
    meta = {'mode': 'end2end', 'input_names': list(END2END_INPUTS),
            'output_names': list(END2END_OUTPUTS), 'export_shape': [1, 3, h, w],
            'preprocess': spec, 'score_thr': module.score_thr, 'nms_pre': module.nms_pre,
            'iou_threshold': module.iou_thr, 'max_per_img': module.max_per_img,
            'input': 'image after the test pipeline and DetDataPreprocessor, (1, 3, H, W) '
                     'float32; img_shape (h, w) before padding; scale_factor (w, h) of the '
                     'resize', **(metadata or {})}
    dynamic_axes = {'input': {2: 'height', 3: 'width'}, 'boxes': {0: 'num_dets'},
                    'scores': {0: 'num_dets'}, 'labels': {0: 'num_dets'}}
    write_checked_onnx(module, example, out_file, END2END_OUTPUTS, dynamic_axes, opset, meta,
                       input_names=END2END_INPUTS)
    if verify_images is None:  # two image sizes, two aspect ratios
        verify_images = [synthetic_image((h, w), seed + 1),
                         synthetic_image((h * 3 // 4 + 5, w // 2 + 7), seed + 2)]
    reports = verify_end2end(out_file, model, cfg, verify_images, rel_tol) \
        if verify_images else []
    return dict(path=out_file, mode='end2end', input_names=list(END2END_INPUTS),
                output_names=list(END2END_OUTPUTS), export_shape=[1, 3, h, w], opset=opset,
                verification=reports)

