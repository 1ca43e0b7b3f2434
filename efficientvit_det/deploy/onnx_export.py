"""ONNX export of EfficientViT detectors in deploy mode (:func:`deploy_model`) and its check.

What is exported
----------------
* ``backbone``: the EfficientViT backbone alone, input ``input`` (N, 3, H, W), one output
  per selected level (``feat_s16``, ``feat_s32``, ``feat_s64`` for the detection configs).
* ``detector``: a single-stage detector (RetinaNet) up to its raw head outputs, input ``input``
  (N, 3, H, W), outputs ``cls_score_{l}`` (N, A*C, H_l, W_l) and ``bbox_pred_{l}``
  (N, A*4, H_l, W_l) per FPN level ``l`` (plus ``score_factor_{l}`` for heads that have them).
  Anchor generation, box decoding, score thresholding and NMS are *not* in the graph: they
  run after onnxruntime through :func:`efficientvit_det.deploy.postprocess`, which calls mmdet's own
  ``bbox_head.predict_by_feat``, so the detections equal ``model.predict``'s.

The input is what the model's ``forward`` takes: the image after mmdet's test pipeline and the
``DetDataPreprocessor`` (resized, BGR->RGB, normalised by mean/std, zero-padded to a multiple
of 32): see :func:`efficientvit_det.deploy.preprocess_images`. Batch, height and width are
dynamic axes.

Exporter
--------
The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used on purpose:

* It records the window padding's shape arithmetic (``(-h) % 7``, the window grid, the crop)
  as ONNX ``Shape``/``Mod``/``Div``/``Slice`` ops, so one graph is right at every input size.
  :func:`verify_onnx` checks that at sizes other than the traced one.
* The ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9) needs the
  extra ``onnxscript`` package and, for this backbone, cannot keep H and W dynamic:
  ``torch.export`` specialises them to the example size because of guards on the window grid
  (e.g. "number of windows == 1" at the stage-3 map, the ``n // (nh * nw)`` batch split),
  and the resulting graph rejects any other input size.
* The legacy exporter prints a ``DeprecationWarning`` under torch >= 2.9; it is silenced here
  (it still ships and works in torch 2.14). ``TracerWarning``\\ s from shape checks whose
  outcome does not depend on the input size are silenced as well; :func:`verify_onnx`
  is the guard that the trace is right.

The fused attention op (``efficientvit_det.ops``) is not in the graph: while tracing or exporting,
``efficientvit_det.ops.plan_attention`` picks the backbone's module path, so the attention runs
the plain PyTorch window path (pad, partition into 7x7 windows, cascaded group attention, reverse, crop), which maps to
standard ONNX ops.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    'DEFAULT_OPSET', 'INPUT_NAME', 'HEAD_OUTPUT_GROUPS', 'BackboneOutputs', 'DetectorRawOutputs',
    'ExportResult', 'export_onnx', 'verify_onnx', 'make_session', 'run_session',
    'other_verify_shape', 'read_metadata', 'write_checked_onnx',
]

DEFAULT_OPSET = 17
INPUT_NAME = 'input'
# Output name prefixes, in the order a dense head's forward returns its per-level lists and
# ``predict_by_feat`` takes them.
HEAD_OUTPUT_GROUPS = ('cls_score', 'bbox_pred', 'score_factor')
_META_PREFIX = 'efficientvit_det.'


# --------------------------------------------------------------------------------------------
# export wrappers
# --------------------------------------------------------------------------------------------
class BackboneOutputs(nn.Module):
    """The backbone alone; returns its tuple of feature maps."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def output_names(self) -> List[str]:
        strides = getattr(self.backbone, 'out_strides', None)
        n = len(getattr(self.backbone, 'out_indices', strides or ()))
        if strides and len(strides) == n:
            return [f'feat_s{s}' for s in strides]
        return [f'feat_{i}' for i in range(n)]

    def forward(self, inputs: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.backbone(inputs))


class DetectorRawOutputs(nn.Module):
    """A single-stage detector up to its dense head's raw outputs.

    ``forward(inputs)`` = ``detector.bbox_head(detector.extract_feat(inputs))`` flattened:
    all levels of the first group (``cls_score``), then of the second (``bbox_pred``), then of
    a third (``score_factor``) for heads that return one. This is exactly what
    ``bbox_head.predict`` feeds to ``predict_by_feat``.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not hasattr(detector, 'bbox_head') or not hasattr(detector, 'extract_feat'):
            raise TypeError(f'{type(detector).__name__} is not a single-stage detector with a '
                            'bbox_head; export the backbone alone (--backbone-only)')
        self.detector = detector

    def raw(self, inputs: Tensor) -> Tuple[List[Tensor], ...]:
        outs = self.detector.bbox_head(self.detector.extract_feat(inputs))
        if not 2 <= len(outs) <= len(HEAD_OUTPUT_GROUPS):
            raise TypeError(f'{type(self.detector.bbox_head).__name__} returns {len(outs)} '
                            'groups of outputs; only (cls_scores, bbox_preds[, score_factors]) '
                            'heads are supported')
        return outs

    def forward(self, inputs: Tensor) -> Tuple[Tensor, ...]:
        return tuple(t for group in self.raw(inputs) for t in group)


def _head_output_names(num_groups: int, num_levels: int) -> List[str]:
    return [f'{HEAD_OUTPUT_GROUPS[g]}_{lvl}' for g in range(num_groups) for lvl in range(num_levels)]


# --------------------------------------------------------------------------------------------
# export and verification
# --------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: str
    mode: str  # 'backbone' | 'detector'
    input_name: str
    output_names: List[str]
    export_shape: Tuple[int, int, int, int]
    opset: int
    verification: List[Dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f'wrote {self.path} ({self.mode}, opset {self.opset}, traced at '
                 f'{"x".join(map(str, self.export_shape))}, dynamic batch/height/width)',
                 f'  input  {self.input_name}',
                 f'  outputs {", ".join(self.output_names)}']
        for v in self.verification:
            lines.append(f'  verified at {v["shape"]}: max rel err {v["max_rel_err"]:.2e} '
                         f'(tolerance {v["rel_tol"]:.0e}; worst output {v["worst_output"]})')
        return '\n'.join(lines)


def other_verify_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """A second (H, W) for verification: about 3/4 of ``shape``, not a multiple of 7 or 32."""
    out = []
    for s in shape:
        v = max(64, s * 3 // 4 + 3)
        while v % 7 == 0 or v % 32 == 0 or v == s:
            v += 1
        out.append(v)
    return tuple(out)


def export_onnx(model: nn.Module, out_file: str, *, shape: Sequence[int] = (800, 1344),
                backbone_only: bool = False, opset: int = DEFAULT_OPSET, batch_size: int = 1,
                verify_shapes: Optional[Sequence[Sequence[int]]] = None, rel_tol: float = 1e-4,
                metadata: Optional[Dict[str, Any]] = None, seed: int = 0) -> ExportResult:
    """Export ``model`` (already in deploy mode: see :func:`deploy_model`) to ONNX.

    Args:
        model: the detector (or, with ``backbone_only``, a detector or a bare backbone).
        out_file: the .onnx file to write (its folder is created).
        shape: (H, W) of the example input the graph is traced with; the exported graph
            accepts any size (batch, height and width are dynamic).
        backbone_only: export the backbone alone.
        opset: ONNX opset (the TorchScript exporter supports 9..20).
        verify_shapes: (H, W) sizes at which onnxruntime must match PyTorch within
            ``rel_tol`` (max abs error <= rel_tol * max |PyTorch output|, per output); ``None``
            = the export size and :func:`other_verify_shape` of it; ``()`` skips the check.
        metadata: extra key -> JSON-able value pairs stored in the model's metadata_props.

    The file is checked with ``onnx.checker`` (full check, shape inference included).
    """
    module, mode = _export_module(model, backbone_only)
    h, w = int(shape[0]), int(shape[1])
    example = torch.randn(batch_size, 3, h, w, generator=torch.Generator().manual_seed(seed))
    names, num_levels = _output_names(module, example)
    meta = {'mode': mode, 'input_name': INPUT_NAME, 'output_names': names,
            'num_levels': num_levels, 'export_shape': [batch_size, 3, h, w],
            'input': 'image after the test pipeline and DetDataPreprocessor '
                     '(RGB, (x - mean) / std, zero-padded to the size divisor), NCHW float32',
            **(metadata or {})}
    dynamic_axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'},
                    **{n: {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'} for n in names}}
    write_checked_onnx(module, example, out_file, names, dynamic_axes, opset, meta)

    result = ExportResult(out_file, mode, INPUT_NAME, names, (batch_size, 3, h, w), opset)
    if verify_shapes is None:
        verify_shapes = [(h, w), other_verify_shape((h, w))]
    if verify_shapes:
        result.verification = verify_onnx(out_file, module, verify_shapes, rel_tol=rel_tol,
                                          batch_size=batch_size, seed=seed + 1)
    return result


def _export_module(model: nn.Module, backbone_only: bool) -> Tuple[nn.Module, str]:
    if backbone_only:
        return BackboneOutputs(getattr(model, 'backbone', model)).eval(), 'backbone'
    return DetectorRawOutputs(model).eval(), 'detector'


@torch.no_grad()
def _output_names(module: nn.Module, example: Tensor) -> Tuple[List[str], int]:
    """The graph's output names and its number of feature levels (from one forward)."""
    if isinstance(module, BackboneOutputs):
        names = module.output_names()
        outs = module(example)
        num_levels = len(names)
    else:
        groups = module.raw(example)
        names = _head_output_names(len(groups), len(groups[0]))
        outs = [t for group in groups for t in group]
        num_levels = len(groups[0])
    if len(outs) != len(names):
        raise RuntimeError(f'{len(outs)} outputs but {len(names)} names')
    return names, num_levels


def write_checked_onnx(module: nn.Module, example: Union[Tensor, Tuple[Tensor, ...]],
                       out_file: str, output_names: Sequence[str],
                       dynamic_axes: Dict[str, Dict[int, str]], opset: int,
                       metadata: Dict[str, Any],
                       input_names: Sequence[str] = (INPUT_NAME,)) -> None:
    """Trace ``module`` at ``example`` (one tensor, or a tuple: one per name of
    ``input_names``) into ``out_file`` with ``metadata`` (JSON values under
    ``efficientvit_det.*`` keys), ``onnx.checker``-checked; the file appears only when complete.

    The legacy TorchScript exporter's DeprecationWarning and the TracerWarnings of shape checks
    whose outcome does not depend on the input size are silenced; the onnxruntime comparison
    (:func:`verify_onnx`) is the guard that the trace is right.
    """
    import onnx

    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    tmp = f'{out_file}.tmp{os.getpid()}'
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            warnings.filterwarnings('ignore', category=FutureWarning)
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(tmp)
        for k, v in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = _META_PREFIX + k, json.dumps(v)
        proto.producer_name = 'efficientvit_det'
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metadata(onnx_file: str) -> Dict[str, Any]:
    """The ``efficientvit_det.*`` metadata written by :func:`export_onnx` (JSON-decoded)."""
    import onnx
    proto = onnx.load(onnx_file, load_external_data=False)
    return {p.key[len(_META_PREFIX):]: json.loads(p.value) for p in proto.metadata_props
            if p.key.startswith(_META_PREFIX)}


def make_session(onnx_file: str, threads: Optional[int] = None, spinning: bool = True):
    """An onnxruntime CPU session (all graph optimisations on).

    ``spinning=False`` stops its worker threads from busy-waiting after each run: needed when
    other code is timed in the same process, which the spinning threads would slow down.
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(onnx_file, sess_options=so, providers=['CPUExecutionProvider'])


def run_session(session, inputs: Union[Tensor, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run ``session`` on one NCHW float32 batch; returns {output name: array}."""
    if isinstance(inputs, Tensor):
        inputs = inputs.detach().cpu().float().numpy()
    name = session.get_inputs()[0].name
    outs = session.run(None, {name: np.ascontiguousarray(inputs, dtype=np.float32)})
    return {o.name: v for o, v in zip(session.get_outputs(), outs)}


def verify_onnx(onnx_file: str, module: nn.Module, shapes: Sequence[Sequence[int]],
                rel_tol: float = 1e-4, batch_size: int = 1, seed: int = 1,
                session=None) -> List[Dict[str, Any]]:
    """Check onnxruntime against ``module`` (PyTorch) on random inputs at each (H, W).

    Raises ``AssertionError`` when onnxruntime fails, an output's shape differs or its max abs
    error exceeds ``rel_tol`` times the max |PyTorch output| of that output (a size baked into
    the graph at trace time shows up here). Returns per-shape reports.
    """
    session = session or make_session(onnx_file)
    g = torch.Generator().manual_seed(seed)
    reports = []
    for hw in shapes:
        x = torch.randn(batch_size, 3, int(hw[0]), int(hw[1]), generator=g)
        with torch.no_grad():
            expected = module(x)
        try:
            got = run_session(session, x)
        except Exception as exc:  # noqa: BLE001 - e.g. a shape baked into the graph
            raise AssertionError(f'{onnx_file}: onnxruntime fails at {batch_size}x3x{hw[0]}x'
                                 f'{hw[1]}: {type(exc).__name__}: {exc}') from exc
        names = [o.name for o in session.get_outputs()]
        errs = {}
        for n, e in zip(names, expected):
            a = got[n]
            if tuple(a.shape) != tuple(e.shape):
                raise AssertionError(f'{onnx_file} at {tuple(hw)}: output {n} has shape '
                                     f'{tuple(a.shape)}, PyTorch gives {tuple(e.shape)}')
            e = e.numpy()
            errs[n] = float(np.abs(a - e).max() / max(float(np.abs(e).max()), 1e-12))
        worst = max(errs, key=errs.get)
        report = dict(shape=f'{batch_size}x3x{hw[0]}x{hw[1]}', max_rel_err=errs[worst],
                      worst_output=worst, rel_tol=rel_tol, per_output=errs)
        if errs[worst] > rel_tol:
            raise AssertionError(f'{onnx_file}: onnxruntime differs from PyTorch at '
                                 f'{report["shape"]}: output {worst} max rel err '
                                 f'{errs[worst]:.3g} > {rel_tol}')
        reports.append(report)
    return reports


