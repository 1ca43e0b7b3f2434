"""Running an exported graph: onnxruntime or OpenVINO, raw-head or end-to-end, float or int8.

* :func:`load_graph`: an ONNX file on an engine (``ort``: onnxruntime's CPU provider, always
  there; ``openvino``: OpenVINO's CPU plugin, an optional dependency) as a
  :class:`GraphRunner`, whose ``run(feed)`` returns ``{output name: array}``.
* :class:`GraphDetector`: a detector graph (the raw graph of :func:`export_onnx` or the
  end-to-end graph of :func:`export_end2end`, float or int8) as a detector: preprocessed batch
  and data samples in, one ``InstanceData`` (``bboxes``, ``scores``, ``labels``) per image out,
  in original-image pixels, as ``model.predict(rescale=True)`` gives. The raw graph is
  post-processed by mmdet's own ``predict_by_feat``; the end-to-end graph has it inside.

* :func:`onnx_detect`: detections of a graph on image files (``tools/onnx_infer.py``).

``tools/onnx_infer.py``, ``tools/test_onnx.py`` (evaluation) and ``python -m benchmarks
engines`` all run graphs through these, so what is timed is what is evaluated.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from efficientvit_det.cli import UserInputError

__all__ = ['ENGINES', 'GraphRunner', 'GraphDetector', 'EngineUnavailableError', 'load_graph',
           'onnx_detect', 'openvino_available', 'openvino_version', 'require_engine']

ENGINES = ('ort', 'openvino')
OPENVINO_HINTS = ('default', 'f32', 'bf16', 'f16')


class EngineUnavailableError(UserInputError):
    """The engine asked for is not installed (OpenVINO is optional)."""


def openvino_available() -> bool:
    try:
        return importlib.util.find_spec('openvino') is not None
    except (ImportError, ValueError):  # e.g. blocked with sys.modules['openvino'] = None
        return False


def openvino_version() -> Optional[str]:
    if not openvino_available():
        return None
    import openvino
    return str(getattr(openvino, '__version__', None) or openvino.get_version())


class GraphRunner:
    """One ONNX graph compiled on one engine; ``run(feed)`` -> ``{output name: array}``."""

    def __init__(self, path: str, engine: str, input_names: Sequence[str],
                 output_names: Sequence[str], run_fn, description: str):
        self.path, self.engine = path, engine
        self.input_names, self.output_names = list(input_names), list(output_names)
        self._run = run_fn
        self.description = description

    def run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self._run(feed)

    def __repr__(self) -> str:
        return f'GraphRunner({self.path!r}, {self.description})'


def _ort_runner(path: str, threads: Optional[int], spinning: bool) -> GraphRunner:
    import onnxruntime

    from .onnx_export import make_session
    session = make_session(path, threads, spinning=spinning)
    outputs = [o.name for o in session.get_outputs()]

    def run(feed):
        return dict(zip(outputs, session.run(outputs, feed)))

    return GraphRunner(path, 'ort', [i.name for i in session.get_inputs()], outputs, run,
                       f'onnxruntime {onnxruntime.__version__} CPUExecutionProvider')


def require_engine(engine: str) -> None:
    """Raise :class:`EngineUnavailableError` (one line for the tools) when ``engine`` cannot
    run here, ``ValueError`` for an unknown name."""
    if engine not in ENGINES:
        raise ValueError(f'engine must be one of {", ".join(ENGINES)}, got {engine!r}')
    if engine == 'openvino' and not openvino_available():
        raise EngineUnavailableError(
            "--engine openvino: OpenVINO is not installed (it is optional: "
            "pip install openvino); use --engine ort")


def _openvino_runner(path: str, threads: Optional[int], hint: str) -> GraphRunner:
    require_engine('openvino')
    if hint not in OPENVINO_HINTS:
        raise ValueError(f'OpenVINO precision hint must be one of {OPENVINO_HINTS}, got {hint!r}')
    import openvino as ov
    core = ov.Core()
    config: Dict[str, Any] = {}
    if threads:
        config['INFERENCE_NUM_THREADS'] = int(threads)
    if hint != 'default':
        config['INFERENCE_PRECISION_HINT'] = hint
    compiled = core.compile_model(core.read_model(path), 'CPU', config)
    request = compiled.create_infer_request()
    inputs = [p.get_any_name() for p in compiled.inputs]
    outputs = [p.get_any_name() for p in compiled.outputs]
    chosen = compiled.get_property('INFERENCE_PRECISION_HINT')
    chosen = chosen.get_type_name() if hasattr(chosen, 'get_type_name') else str(chosen)

    def run(feed):
        result = request.infer(feed)
        # the request reuses its output buffers: copy before the next call overwrites them
        return {name: np.array(result[port]) for name, port in zip(outputs, compiled.outputs)}

    return GraphRunner(path, 'openvino', inputs, outputs, run,
                       f'OpenVINO {openvino_version()} CPU, INFERENCE_PRECISION_HINT {chosen}'
                       + (' (its default)' if hint == 'default' else ''))


def load_graph(path: str, engine: str = 'ort', threads: Optional[int] = None, *,
               spinning: bool = True, openvino_hint: str = 'default') -> GraphRunner:
    """``path`` compiled on ``engine`` (``ort`` | ``openvino``).

    ``threads``: intra-op threads (default: the engine's). ``spinning`` (onnxruntime):
    ``False`` stops idle workers busy-waiting, needed when other code is timed in the same
    process. ``openvino_hint``: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``default`` leaves
    its own choice: bf16 on CPUs with AVX512-BF16/AMX, f32 elsewhere; ``f32`` forces float32).
    Raises :class:`EngineUnavailableError` when OpenVINO is asked for and not installed.
    """
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f'ONNX file not found: {path}')
    if engine == 'ort':
        return _ort_runner(path, threads, spinning)
    if engine == 'openvino':
        return _openvino_runner(path, threads, openvino_hint)
    raise ValueError(f'engine must be one of {", ".join(ENGINES)}, got {engine!r}')


class GraphDetector:
    """An exported detector graph on an engine, used like ``model.predict``.

    ``predict(inputs, data_samples)``: ``inputs`` the (N, 3, H, W) batch after the test
    pipeline and ``DetDataPreprocessor`` (:func:`efficientvit_det.deploy.preprocess_images`, or a
    test dataloader's batch through the data preprocessor), ``data_samples`` their samples
    (``img_shape``, ``scale_factor`` in the metainfo). Returns one ``InstanceData`` per image
    with boxes in original-image pixels. An end-to-end graph (batch 1) runs once per image.
    """

    def __init__(self, cfg, path: str, engine: str = 'ort', threads: Optional[int] = None, *,
                 spinning: bool = True, openvino_hint: str = 'default'):
        from .onnx_export import read_metadata
        self.path = path
        self.metadata = read_metadata(path) if _is_file(path) else {}
        self.mode = self.metadata.get('mode', 'detector')
        if self.mode not in ('detector', 'end2end'):
            raise UserInputError(f'{path} is a {self.mode} export; export the detector '
                                 '(without --backbone-only)')
        self.runner = load_graph(path, engine, threads, spinning=spinning,
                                 openvino_hint=openvino_hint)
        self.head = None
        if self.mode == 'detector':
            from .postprocess import build_bbox_head
            self.head = build_bbox_head(cfg)
        self.last_outputs: Dict[str, np.ndarray] = {}

    @property
    def precision(self) -> str:
        """``int8`` for a graph written by ``--int8``, else ``fp32``."""
        return 'int8' if self.metadata.get('quantization') else 'fp32'

    def network(self, inputs, data_samples=None) -> Dict[str, np.ndarray]:
        """The graph alone on the batch (no post-processing outside it)."""
        x = _as_array(inputs)
        if self.mode == 'detector':
            return self.runner.run({self.runner.input_names[0]: x})
        out: Dict[str, np.ndarray] = {}
        for i in range(x.shape[0]):
            out = self.runner.run(_end2end_feed(x[i:i + 1], data_samples[i].metainfo))
        return out

    def predict(self, inputs, data_samples) -> List[Any]:
        import torch
        from mmengine.structures import InstanceData
        x = _as_array(inputs)
        metas = [s.metainfo for s in data_samples]
        if self.mode == 'detector':
            from .postprocess import postprocess
            outputs = self.runner.run({self.runner.input_names[0]: x})
            self.last_outputs = outputs
            return list(postprocess(outputs, metas, self.head))
        results = []
        for i, meta in enumerate(metas):
            out = self.runner.run(_end2end_feed(x[i:i + 1], meta))
            self.last_outputs = out
            res = InstanceData()
            res.bboxes = torch.from_numpy(np.asarray(out['boxes'], np.float32).reshape(-1, 4))
            res.scores = torch.from_numpy(np.asarray(out['scores'], np.float32).reshape(-1))
            res.labels = torch.from_numpy(np.asarray(out['labels']).astype(np.int64).reshape(-1))
            results.append(res)
        return results


def _is_file(path: str) -> bool:
    import os
    return os.path.isfile(path)


def _as_array(inputs) -> np.ndarray:
    if hasattr(inputs, 'detach'):
        inputs = inputs.detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(inputs, dtype=np.float32))


def _end2end_feed(x: np.ndarray, meta: dict) -> Dict[str, np.ndarray]:
    return {'input': x,
            'img_shape': np.asarray([float(v) for v in meta['img_shape'][:2]], np.float32),
            'scale_factor': np.asarray([float(v) for v in meta['scale_factor'][:2]], np.float32)}


def onnx_detect(cfg, onnx_file: str, images: Sequence[str], score_thr: float = 0.3,
                batch_size: int = 1, threads: Optional[int] = None,
                engine: str = 'ort') -> List[dict]:
    """Detections of an exported detector graph (raw-head or end-to-end, float or int8) run by
    ``engine`` (``ort`` | ``openvino``: :class:`GraphDetector`);
    one :func:`detections_entry` per image. An end-to-end graph runs one image at a time."""
    from .postprocess import class_names, detections_entry, preprocess_images

    detector = GraphDetector(cfg, onnx_file, engine, threads)
    names = class_names(cfg, detector.metadata)
    entries = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        inputs, samples = preprocess_images(cfg, chunk)
        results = detector.predict(inputs, samples)
        for path, sample, res in zip(chunk, samples, results):
            h, w = sample.metainfo['ori_shape'][:2]
            entries.append(detections_entry(path, w, h, res.bboxes.tolist(), res.scores.tolist(),
                                            res.labels.tolist(), names, score_thr))
    return entries
