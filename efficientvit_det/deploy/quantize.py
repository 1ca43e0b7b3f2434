"""INT8 post-training quantisation of exported detector graphs (onnxruntime's static QDQ).

What it does (``tools/export_onnx.py ... --int8``, docs/deploy.md "INT8"):

1. **Calibration images** (:func:`calibration_images`): ``N`` images of the config's training
   split (or ``val``/``test``, or a folder), spread evenly over it, each through the config's
   *test* pipeline and ``DetDataPreprocessor`` (:func:`preprocess_images`): the inputs the graph
   sees at inference, not training augmentations.
2. **Pre-processing** of the float graph (onnxruntime's ``quant_pre_process``: shape
   inference, constant folding, Conv+BN/Add fusions).
3. **Which nodes stay in float** (:func:`keep_float_nodes`), found in the graph by its
   structure, not by names, so raw-head and end-to-end graphs (and other detectors) are
   treated alike. Groups: ``stem`` (the first conv, on the normalised image), ``attention``
   (the softmax and the two activation x activation MatMuls of each attention head),
   ``head_out`` (the heads' last convs: class logits and box deltas), ``norm``
   (InstanceNormalization of GroupNorm heads, LayerNormalization; only matters when their op
   types are quantised). The default,
   :data:`DEFAULT_KEEP_FLOAT`, was chosen by measurement (docs/deploy.md: mAP on the demo's
   validation split and speed at 800x1344).
4. **Static quantisation** (``quantize_static``, QDQ format): int8 weights per output
   channel, uint8 activations with ranges calibrated on the images (MinMax by default), only
   the op types in :data:`DEFAULT_OP_TYPES`. In an end-to-end graph only the network is
   quantised: anchors, decoding and NMS stay float.
5. The graph's ``efficientvit_det.*`` metadata is carried over and a ``quantization`` entry
   added (what stayed float, calibration source and size, settings).
"""
from __future__ import annotations

import copy
import json
import os
import os.path as osp
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from efficientvit_det.cli import UserInputError

__all__ = ['CALIB_SPLITS', 'CALIB_METHODS', 'DEFAULT_KEEP_FLOAT', 'DEFAULT_OP_TYPES',
           'KEEP_FLOAT_GROUPS', 'CalibrationError', 'UnsupportedOpError', 'QuantizeResult',
           'ImageCalibrationReader', 'calibration_images', 'check_supported_ops',
           'compare_with_float', 'detection_agreement', 'export_int8', 'keep_float_nodes',
           'quantizable_op_types', 'quantize_graph']

CALIB_SPLITS = ('train', 'val', 'test')
CALIB_METHODS = ('minmax', 'percentile', 'entropy')
KEEP_FLOAT_GROUPS = {
    'stem': 'the first conv (it reads the normalised image)',
    'attention': 'the attention softmax and its activation x activation MatMuls (q.k, attn.v)',
    'head_out': "the heads' last convs (class logits, box deltas)",
    'norm': 'InstanceNormalization (GroupNorm heads) and LayerNormalization',
}
# Chosen by measurement (docs/deploy.md, "What stays in float"): on the demo model every choice
# cost 0.1-0.2 points of bbox mAP; keeping the heads' last convs float made RetinaNet-M4's int8
# graph 1.75x instead of 2.2x faster than float at 800x1344; the attention's MatMuls cost
# nothing measurable either way and stay float (activation x activation products).
DEFAULT_KEEP_FLOAT = ('attention',)
# The ops whose int8 kernels do the work (convolutions, matrix products); element-wise ops
# between them stay float (their QDQ pairs would cost more than the op).
DEFAULT_OP_TYPES = ('Conv', 'MatMul')
_STANDARD_DOMAINS = ('', 'ai.onnx', 'com.microsoft')
_COMPUTE_OPS = ('Conv', 'ConvTranspose', 'MatMul', 'Gemm')


class CalibrationError(UserInputError, ValueError):
    """The calibration set cannot be used (missing, empty, unreadable)."""


class UnsupportedOpError(UserInputError, ValueError):
    """The graph (or an option) names an op the quantiser or onnxruntime cannot handle."""


# --------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------
def _strip_pipelines(ds_cfg) -> None:
    """No transforms: only the image list of a dataset (and its wrapped datasets) is read."""
    if 'pipeline' in ds_cfg:
        ds_cfg['pipeline'] = []
    for key in ('dataset', 'datasets'):
        inner = ds_cfg.get(key)
        for d in (inner if isinstance(inner, (list, tuple)) else [inner] if inner else []):
            _strip_pipelines(d)


def _split_images(cfg, split: str, num_images: int) -> List[str]:
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    loader = cfg.get(f'{split}_dataloader')
    if not loader or not loader.get('dataset'):
        raise CalibrationError(f'calibration set: the config has no {split}_dataloader; give a '
                               'folder of images with --calib FOLDER')
    ds_cfg = copy.deepcopy(loader['dataset'])
    _strip_pipelines(ds_cfg)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    try:
        dataset = DATASETS.build(ds_cfg)
    except (FileNotFoundError, OSError) as exc:
        raise CalibrationError(f"calibration set: the config's {split} split cannot be read "
                               f'({exc}); generate or point to the data (--cfg-options '
                               f'{split}_dataloader.dataset.data_root=...), or give a folder of '
                               'images with --calib FOLDER') from exc
    if len(dataset) == 0:
        raise CalibrationError(f"calibration set: the config's {split} split has no images")
    paths = [dataset.get_data_info(int(i))['img_path']
             for i in _spread(len(dataset), num_images)]
    missing = [p for p in paths if not osp.isfile(p)]
    if missing:
        raise CalibrationError(f"calibration set: {len(missing)} of {len(paths)} images of the "
                               f"config's {split} split are missing, e.g. {missing[0]}")
    return paths


def _spread(total: int, num: int) -> List[int]:
    """``num`` indices spread evenly over ``range(total)`` (all of them when num >= total)."""
    if num >= total:
        return list(range(total))
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, num)})


def calibration_images(cfg, source: str = 'train', num_images: int = 32) -> List[str]:
    """Image files to calibrate on: ``num_images`` of the config's ``train``/``val``/``test``
    split (``source``), spread evenly over it, or of a folder (sorted, spread the same way).

    Raises :class:`CalibrationError` (a user error) when the split or folder is missing, empty
    or names missing files.
    """
    if num_images < 1:
        raise CalibrationError(f'--calib-images must be >= 1, got {num_images}')
    if source in CALIB_SPLITS:
        return _split_images(cfg, source, num_images)
    if not osp.isdir(source):
        raise CalibrationError(f'calibration set not found: {source} is neither a split of the '
                               f'config ({", ".join(CALIB_SPLITS)}) nor a folder of images')
    from efficientvit_det.datasets.image_files import IMG_EXTENSIONS, images_in_folder
    files = images_in_folder(source)
    if not files:
        raise CalibrationError(f'calibration set: no images ({", ".join(IMG_EXTENSIONS)}) in '
                               f'{source}')
    return [files[i] for i in _spread(len(files), num_images)]


def _feed(cfg, image, input_names: Sequence[str]) -> Dict[str, np.ndarray]:
    from .postprocess import preprocess_images
    inputs, samples = preprocess_images(cfg, [image])
    feed = {input_names[0]: inputs.numpy().astype(np.float32)}
    if 'img_shape' in input_names:  # the end-to-end graph
        meta = samples[0].metainfo
        feed['img_shape'] = np.asarray(meta['img_shape'][:2], np.float32)
        feed['scale_factor'] = np.asarray(meta['scale_factor'][:2], np.float32)
    return feed


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader
    return CalibrationDataReader


class ImageCalibrationReader(_reader_base()):
    """onnxruntime's ``CalibrationDataReader`` over images (paths or BGR arrays): each one
    through the config's test pipeline and data preprocessor when it is read (one image in
    memory at a time), fed with the graph's input names."""

    def __init__(self, cfg, images: Sequence[Any], input_names: Sequence[str]):
        self.cfg, self.images, self.input_names = cfg, list(images), list(input_names)
        self._it: Iterator[Any] = iter(self.images)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        image = next(self._it, None)
        return None if image is None else _feed(self.cfg, image, self.input_names)

    def rewind(self) -> None:
        self._it = iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------------------------
# the graph: supported ops, what stays float
# --------------------------------------------------------------------------------------------
def quantizable_op_types() -> List[str]:
    """Op types onnxruntime's static quantiser can put in int8 (its QDQ + QLinear registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def check_supported_ops(model, op_types: Sequence[str] = ()) -> None:
    """Raise :class:`UnsupportedOpError` for a node outside the standard ONNX (and onnxruntime)
    domains, which neither the quantiser nor onnxruntime can run (e.g. a custom op left in the
    graph), or for an op type in ``op_types`` that the quantiser has no int8 form of."""
    bad = [n for n in model.graph.node if n.domain not in _STANDARD_DOMAINS]
    if bad:
        kinds = sorted({f'{n.domain}::{n.op_type}' for n in bad})
        raise UnsupportedOpError(
            f'unsupported op {kinds[0]} in the graph (node {bad[0].name!r}'
            f'{f" and {len(bad) - 1} more" if len(bad) > 1 else ""}; kinds: {", ".join(kinds)}): '
            "only standard ONNX ops can be quantised and run by onnxruntime. Export with "
            "tools/export_onnx.py, which writes the attention as standard ops")
    known = set(quantizable_op_types())
    unknown = [t for t in op_types if t not in known]
    if unknown:
        raise UnsupportedOpError(
            f'unsupported op for int8: {", ".join(unknown)} (onnxruntime\'s quantiser has no '
            f'int8 form of it); choose from {", ".join(sorted(known))}')


def _graph_index(graph):
    producer = {out: n for n in graph.node for out in n.output}
    consumers: Dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constant = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == 'Constant' for o in n.output}
    return producer, consumers, constant


def _is_constant(name: str, producer, constant) -> bool:
    """An initializer, a Constant, or computed from them alone (e.g. a transposed weight)."""
    seen, todo = set(), [name]
    while todo:
        t = todo.pop()
        if t in seen or t in constant or t == '':
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:  # a graph input
            return False
        todo.extend(node.input)
    return True


def _walk_up(producer, constant, tensors: Iterable[str],
             stop: Callable[[Any], bool] = lambda node: False) -> Iterator[Any]:
    """The nodes producing ``tensors`` and, breadth first, their producers (each node once,
    constants not followed); the inputs of a node for which ``stop`` is true are not followed."""
    seen, todo = set(), deque(tensors)
    while todo:
        node = producer.get(todo.popleft())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if not stop(node):
            todo.extend(i for i in node.input if i not in constant)


def keep_float_nodes(model, groups: Sequence[str]) -> Dict[str, List[str]]:
    """``{group: [node names]}`` of the nodes each group of :data:`KEEP_FLOAT_GROUPS` keeps in
    float, found by the graph's structure:

    * ``stem``: the first Conv(s) reached from the image input;
    * ``attention``: every Softmax, and every MatMul whose two inputs are both computed from
      the image (q.k and attn.v, not a layer with weights);
    * ``head_out``: the last Conv/MatMul/Gemm on every path back from the graph's outputs
      (through post-processing ops in an end-to-end graph);
    * ``norm``: InstanceNormalization / LayerNormalization / GroupNormalization nodes.
    """
    unknown = [g for g in groups if g not in KEEP_FLOAT_GROUPS]
    if unknown:
        raise UserInputError(f'unknown float group(s) {", ".join(unknown)}; choose from '
                             f'{", ".join(KEEP_FLOAT_GROUPS)}')
    graph = model.graph
    producer, consumers, constant = _graph_index(graph)
    out: Dict[str, List[str]] = {}
    if 'stem' in groups:
        inputs = [i.name for i in graph.input if i.name not in constant]
        image = 'input' if 'input' in inputs else inputs[0]
        found, seen, todo = [], set(), deque([image])
        while todo:
            t = todo.popleft()
            for n in consumers.get(t, []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op_type in _COMPUTE_OPS:
                    found.append(n.name)
                else:
                    todo.extend(n.output)
        out['stem'] = found
    if 'attention' in groups:
        out['attention'] = [
            n.name for n in graph.node
            if n.op_type == 'Softmax' or (
                n.op_type == 'MatMul'
                and not any(_is_constant(i, producer, constant) for i in n.input))]
    if 'head_out' in groups:
        # the first compute nodes met walking up from the outputs: the heads' last convs
        out['head_out'] = [n.name for n in _walk_up(producer, constant, (o.name for o in graph.output),
                                                      stop=lambda n: n.op_type in _COMPUTE_OPS)
                           if n.op_type in _COMPUTE_OPS]
    if 'norm' in groups:
        out['norm'] = [n.name for n in graph.node if n.op_type in (
            'InstanceNormalization', 'LayerNormalization', 'GroupNormalization')]
    return {g: out[g] for g in groups}


def _network_nodes(model) -> List[str]:
    """The nodes the network's outputs depend on: all of a raw graph; in an end-to-end graph
    the backbone, neck and head up to the head's last convs, not anchors, decoding or NMS."""
    graph = model.graph
    producer, _, constant = _graph_index(graph)
    last = set(keep_float_nodes(model, ['head_out'])['head_out'])
    start = (i for n in graph.node if n.name in last for i in n.input)
    return list(last) + [n.name for n in _walk_up(producer, constant, start)]


# --------------------------------------------------------------------------------------------
# quantisation
# --------------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    path: str
    keep_float: List[str]
    float_nodes: Dict[str, List[str]]
    op_types: List[str]
    num_calibration_images: int
    calibration: str
    calibrate_method: str
    per_channel: bool
    reduce_range: bool
    quantized_nodes: Dict[str, int] = field(default_factory=dict)  # op type -> count
    float_compute_nodes: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        q = ', '.join(f'{n} {t}' for t, n in sorted(self.quantized_nodes.items()))
        f = ', '.join(f'{n} {t}' for t, n in sorted(self.float_compute_nodes.items())) or 'none'
        kept = ', '.join(f'{g} ({len(self.float_nodes.get(g, []))} nodes)'
                         for g in self.keep_float) or 'nothing'
        return (f'wrote {self.path} (int8: QDQ, {"per-channel " if self.per_channel else ""}'
                f'int8 weights{" (7-bit range)" if self.reduce_range else ""}, uint8 '
                f'activations; {self.calibrate_method} calibration on '
                f'{self.num_calibration_images} images of {self.calibration}; '
                f'{self.seconds:.0f} s)\n'
                f'  int8 compute nodes: {q or "none"}\n'
                f'  kept in float: {kept}; float compute nodes left: {f}')


def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    methods = {'minmax': CalibrationMethod.MinMax, 'percentile': CalibrationMethod.Percentile,
               'entropy': CalibrationMethod.Entropy}
    if name not in methods:
        raise UserInputError(f'calibration method must be one of {", ".join(methods)}, '
                             f'got {name!r}')
    return methods[name]


def _count_compute(model) -> Dict[str, Dict[str, int]]:
    """Compute nodes of a QDQ graph: int8 (every float input, weights included, comes
    from a DequantizeLinear) vs float."""
    producer, _, _ = _graph_index(model.graph)
    q: Dict[str, int] = {}
    f: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type not in _COMPUTE_OPS:
            continue
        data_inputs = n.input[:2]
        is_q = all(producer.get(i) is not None and producer[i].op_type == 'DequantizeLinear'
                   for i in data_inputs)
        bucket = q if is_q else f
        bucket[n.op_type] = bucket.get(n.op_type, 0) + 1
    return dict(quantized=q, float=f)


def quantize_graph(float_file: str, out_file: str, cfg, images: Sequence[Any], *,
                   keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
                   op_types: Sequence[str] = DEFAULT_OP_TYPES, per_channel: bool = True,
                   reduce_range: bool = True, calibrate_method: str = 'minmax',
                   calibration: str = '') -> QuantizeResult:
    """Quantise the float graph ``float_file`` (from :func:`export_onnx` or
    :func:`export_end2end`) to ``out_file`` (QDQ int8), calibrated on ``images`` (paths or BGR
    arrays; :func:`calibration_images`) through ``cfg``'s test pipeline.

    ``keep_float``: groups of :data:`KEEP_FLOAT_GROUPS` that stay float. ``op_types``: op types
    to quantise. ``reduce_range`` (default on): 7-bit weights. Without it, onnxruntime's int8
    kernels on CPUs without VNNI (AVX2's ``vpmaddubsw`` adds pairs of u8 x s8 products in int16,
    which saturates) do not compute what the QDQ graph says: measured on this project's models,
    their outputs differ from an exact QDQ evaluation by 15-35% (relative RMS) against 4% with
    7-bit weights (docs/deploy.md). A graph only for VNNI CPUs can turn it off. ``calibrate_method``:
    ``minmax`` keeps only each tensor's min and max per image; ``percentile`` and ``entropy``
    keep every intermediate tensor of every image in memory (about 1-2 GB per 800x1344 image
    for RetinaNet-M4).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_export import read_metadata
    t0 = time.perf_counter()
    if not images:
        raise CalibrationError('calibration set: no images')
    model = onnx.load(float_file)
    check_supported_ops(model, op_types)
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), 0)
    if per_channel and opset < 13:
        raise UserInputError(f'--int8 needs opset >= 13 (per-channel QuantizeLinear); the '
                             f'graph has opset {opset}: export with --opset 13 or newer')
    metadata = read_metadata(float_file)
    method = _calibrate_method(calibrate_method)
    out_dir = osp.dirname(osp.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='int8_', dir=out_dir) as tmp:
        pre = osp.join(tmp, 'pre.onnx')
        quant_pre_process(float_file, pre, skip_symbolic_shape=True)
        pre_model = onnx.load(pre)
        groups = keep_float_nodes(pre_model, keep_float)
        excluded = sorted({n for names in groups.values() for n in names})
        network = _network_nodes(pre_model)
        nodes_to_quantize = [n for n in network if n not in set(excluded)]
        input_names = [i.name for i in pre_model.graph.input
                       if i.name not in {x.name for x in pre_model.graph.initializer}]
        reader = ImageCalibrationReader(cfg, images, input_names)
        tmp_out = osp.join(tmp, 'int8.onnx')
        quantize_static(
            pre, tmp_out, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
            per_channel=per_channel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=excluded,
            calibrate_method=method)
        qmodel = onnx.load(tmp_out)
        counts = _count_compute(qmodel)
        result = QuantizeResult(
            path=out_file, keep_float=list(keep_float), float_nodes=groups,
            op_types=list(op_types), num_calibration_images=len(images),
            calibration=calibration or 'the given images', calibrate_method=calibrate_method,
            per_channel=per_channel, reduce_range=reduce_range,
            quantized_nodes=counts['quantized'], float_compute_nodes=counts['float'])
        if not counts['quantized']:
            raise UnsupportedOpError(f'nothing was quantised: the graph has no {", ".join(op_types)} '
                                     'node outside the float groups')
        del qmodel.metadata_props[:]
        info = dict(format='QDQ', weights='int8 per-channel' if per_channel else 'int8',
                    activations='uint8', reduce_range=reduce_range, op_types=list(op_types),
                    keep_float=list(keep_float), calibration=result.calibration,
                    calibration_images=len(images), calibrate_method=calibrate_method,
                    quantized_nodes=counts['quantized'], float_compute_nodes=counts['float'],
                    onnxruntime=_ort_version())
        for k, v in {**metadata, 'quantization': info}.items():
            entry = qmodel.metadata_props.add()
            entry.key, entry.value = f'efficientvit_det.{k}', json.dumps(v)
        qmodel.producer_name = 'efficientvit_det'
        staged = osp.join(tmp, 'final.onnx')
        onnx.save(qmodel, staged)
        onnx.checker.check_model(staged)
        os.replace(staged, out_file)
    result.seconds = time.perf_counter() - t0
    return result


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


# --------------------------------------------------------------------------------------------
# how close the int8 graph is to the float one
# --------------------------------------------------------------------------------------------
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _arrays(dets):
    def get(key):
        v = dets[key] if isinstance(dets, dict) else getattr(dets, key)
        return np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v)
    return (get('bboxes').reshape(-1, 4).astype(np.float64), get('scores').reshape(-1),
            get('labels').reshape(-1))


def detection_agreement(reference, candidate, score_thr: float = 0.3,
                        iou_thr: float = 0.5) -> Dict[str, Any]:
    """How well ``candidate``'s detections reproduce ``reference``'s (each an ``InstanceData``
    or a dict with ``bboxes``, ``scores``, ``labels``).

    Reference detections scoring >= ``score_thr`` are matched greedily (best score first) to
    candidate detections of the same label scoring >= ``score_thr / 2`` (so a score that moves
    across the threshold is not a miss) with IoU >= ``iou_thr``. ``recall``: the share of them
    matched; ``precision``: the share of candidate detections >= ``score_thr`` that match a
    reference detection >= ``score_thr / 2``; ``mean_iou`` and ``max_score_diff`` over the
    matches. Both shares are 1.0 when there is nothing to match.
    """
    def one_way(ref, cand):
        rb, rs, rl = ref
        cb, cs, cl = cand
        sel_r = np.flatnonzero(rs >= score_thr)
        sel_r = sel_r[np.argsort(-rs[sel_r], kind='stable')]
        sel_c = np.flatnonzero(cs >= score_thr / 2)
        used = np.zeros(len(sel_c), bool)
        ious, diffs = [], []
        iou = _box_iou(rb[sel_r], cb[sel_c]) if len(sel_r) and len(sel_c) else None
        for k, i in enumerate(sel_r):
            if iou is None:
                break
            ok = (~used) & (cl[sel_c] == rl[i]) & (iou[k] >= iou_thr)
            if ok.any():
                j = int(np.flatnonzero(ok)[np.argmax(iou[k][ok])])
                used[j] = True
                ious.append(float(iou[k, j]))
                diffs.append(abs(float(rs[i]) - float(cs[sel_c[j]])))
        return len(sel_r), ious, diffs

    ref, cand = _arrays(reference), _arrays(candidate)
    n_ref, ious, diffs = one_way(ref, cand)
    n_cand, ious_back, _ = one_way(cand, ref)
    return dict(num_reference=n_ref, num_candidate=n_cand,
                recall=len(ious) / n_ref if n_ref else 1.0,
                precision=len(ious_back) / n_cand if n_cand else 1.0,
                mean_iou=float(np.mean(ious)) if ious else None,
                max_score_diff=float(np.max(diffs)) if diffs else None,
                score_thr=score_thr, iou_thr=iou_thr)


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS of ``a - b`` relative to the RMS of ``b``."""
    b = np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2))
                 / max(np.sqrt(np.mean(b ** 2)), 1e-12))


def compare_with_float(cfg, float_file: str, int8_file: str, images: Sequence[Any],
                       score_thr: float = 0.3) -> List[Dict[str, Any]]:
    """The int8 graph against the float graph on ``images`` (paths or BGR arrays), both run by
    onnxruntime: :func:`detection_agreement` per image and, for raw-head graphs, each output
    map's relative RMS error (``max_rel_rms``: the worst output)."""
    from .postprocess import preprocess_images
    from .runtime import GraphDetector
    ref, cand = GraphDetector(cfg, float_file), GraphDetector(cfg, int8_file)
    reports = []
    for img in images:
        inputs, samples = preprocess_images(cfg, [img])
        a, b = ref.predict(inputs, samples)[0], cand.predict(inputs, samples)[0]
        report = detection_agreement(a, b, score_thr)
        report['input_shape'] = 'x'.join(map(str, inputs.shape))
        if ref.mode == 'detector':
            errs = {k: _rel_rms(cand.last_outputs[k], v) for k, v in ref.last_outputs.items()}
            worst = max(errs, key=errs.get)
            report.update(max_rel_rms=errs[worst], worst_output=worst)
        reports.append(report)
    return reports


def export_int8(model, out_file: str, cfg, images: Sequence[Any], *, end2end: bool = False,
                shape: Sequence[int] = (800, 1344), opset: int = 17, verify_float: bool = True,
                metadata: Optional[Dict[str, Any]] = None, compare_images: int = 2,
                **quantize_kwargs) -> Dict[str, Any]:
    """Export ``model`` (deploy mode) to a float graph (raw head outputs, or ``end2end`` with
    decoding and NMS), verify it against PyTorch as a float export is, quantise it to
    ``out_file`` on ``images`` (:func:`quantize_graph`, ``quantize_kwargs``), and compare the
    int8 graph with the float one on the first ``compare_images`` of them
    (:func:`compare_with_float`). Returns a summary dict.
    """
    from .onnx_export import export_onnx
    out_dir = osp.dirname(osp.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='float_', dir=out_dir) as tmp:
        float_file = osp.join(tmp, 'float.onnx')
        if end2end:
            from .end2end import export_end2end
            float_summary = export_end2end(model, float_file, cfg, shape=shape, opset=opset,
                                           verify_images=None if verify_float else (),
                                           metadata=metadata)
        else:
            res = export_onnx(model, float_file, shape=shape, opset=opset,
                              verify_shapes=None if verify_float else (), metadata=metadata)
            float_summary = dict(mode=res.mode, output_names=res.output_names,
                                 export_shape=list(res.export_shape), opset=res.opset,
                                 verification=res.verification)
        result = quantize_graph(float_file, out_file, cfg, images, **quantize_kwargs)
        comparison = compare_with_float(cfg, float_file, out_file, images[:compare_images])
    return dict(path=out_file, mode='end2end' if end2end else 'detector', float=float_summary,
                quantization=result.as_dict(), comparison=comparison,
                summary=result.summary())
