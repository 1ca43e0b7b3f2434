"""COCO evaluation of exported graphs and of the PyTorch model, side by side, on the same data.

:func:`evaluate_detectors` runs the config's test dataloader once; every batch goes through the
config's ``DetDataPreprocessor`` and then through each detector (a
:class:`efficientvit_det.deploy.runtime.GraphDetector`: an ONNX graph, float or int8, raw-head
or end-to-end, on onnxruntime or OpenVINO; or a :class:`TorchDetector`: the PyTorch model in its
inference form), and each one's predictions go to its own copy of the config's
``test_evaluator`` (mmdet's ``CocoMetric``): the metric and the data pipeline ``tools/test.py``
uses, so the accuracy cost of a graph is one command (``tools/test_onnx.py``).
"""
from __future__ import annotations

import copy
import os
import time
from contextlib import redirect_stdout
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

__all__ = ['TorchDetector', 'evaluate_detectors', 'build_test_dataloader']


class TorchDetector:
    """The PyTorch detector in the inference form ``tools/test.py`` runs
    (:func:`efficientvit_det.inference.prepare_inference`: deploy mode, ``precision``)."""

    def __init__(self, model: nn.Module, precision: str = 'fp32', deploy: bool = True):
        from .form import prepare_inference
        self.model = model.eval()
        self.choice = prepare_inference(model, precision, deploy, log=False)
        self.precision = self.choice.name

    @torch.no_grad()
    def predict(self, inputs, data_samples) -> List[Any]:
        samples = [s.clone() for s in data_samples]
        with self.choice.autocast():
            out = self.model.predict(inputs, samples, rescale=True)
        return [s.pred_instances for s in out]


def build_test_dataloader(cfg):
    """The config's test dataloader (mmengine's builder; the test pipeline, batch size and
    sampler of the config)."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))


def _evaluator(cfg, dataset_meta, img_ids: Optional[List[int]]):
    from mmengine.evaluator import Evaluator
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = dataset_meta
    if img_ids is not None:  # a subset: score only the images that were run
        for metric in evaluator.metrics:
            if hasattr(metric, 'img_ids'):
                metric.img_ids = list(img_ids)
    return evaluator


def evaluate_detectors(cfg, detectors: Mapping[str, Any], max_images: Optional[int] = None,
                       log: Optional[Callable[[str], None]] = None,
                       quiet: bool = True) -> Dict[str, Any]:
    """COCO metrics of every detector in ``detectors`` (name -> object with
    ``predict(inputs, data_samples)``, e.g. :class:`GraphDetector`, :class:`TorchDetector`) on
    the config's test split, all on the same preprocessed batches.

    ``max_images``: stop after that many images (the metric then scores those images only).
    ``log``: called with progress lines. ``quiet``: swallow pycocotools' printed tables.
    Returns ``{'num_images', 'seconds': {name: s}, 'metrics': {name: {metric: value}}}``.
    """
    from mmdet.registry import MODELS
    dataloader = build_test_dataloader(cfg)
    preprocessor = MODELS.build(copy.deepcopy(cfg.model.data_preprocessor))
    total = len(dataloader.dataset)
    limit = total if max_images is None else min(int(max_images), total)
    seconds = {name: 0. for name in detectors}
    results: Dict[str, list] = {name: [] for name in detectors}
    img_ids: List[int] = []
    done, t0, next_log = 0, time.perf_counter(), 0.
    for data_batch in dataloader:
        if done >= limit:
            break
        data = preprocessor(data_batch, False)
        inputs, samples = data['inputs'], data['data_samples']
        keep = min(len(samples), limit - done)
        inputs, samples = inputs[:keep], samples[:keep]
        for name, det in detectors.items():
            t = time.perf_counter()
            preds = det.predict(inputs, samples)
            seconds[name] += time.perf_counter() - t
            for s, p in zip(samples, preds):
                out = s.clone()
                out.pred_instances = p
                results[name].append(out)
        img_ids.extend(int(s.metainfo['img_id']) for s in samples)
        done += keep
        if log is not None and (time.perf_counter() - next_log > 10 or done == limit):
            next_log = time.perf_counter()
            log(f'  {done}/{limit} images ({done / max(next_log - t0, 1e-9):.1f} img/s)')
    metrics: Dict[str, Dict[str, float]] = {}
    for name in detectors:
        evaluator = _evaluator(cfg, dataloader.dataset.metainfo,
                               img_ids if limit < total else None)
        evaluator.process(data_samples=results[name], data_batch=None)
        if quiet:
            with open(os.devnull, 'w') as devnull, redirect_stdout(devnull):
                metrics[name] = evaluator.evaluate(len(results[name]))
        else:
            metrics[name] = evaluator.evaluate(len(results[name]))
    return dict(num_images=done, seconds=seconds,
                metrics={n: {k: float(v) for k, v in m.items()} for n, m in metrics.items()})
