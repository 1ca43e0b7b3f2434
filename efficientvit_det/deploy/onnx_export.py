"""ONNX export of EfficientViT detectors in deploy mode, and the matching post-processing.

What is exported
----------------
* ``backbone``: the EfficientViT backbone alone, input ``input`` (N, 3, H, W), one output
  per selected level (``feat_s16``, ``feat_s32``, ``feat_s64`` for the detection configs).
* ``detector``: a single-stage detector (RetinaNet) up to its raw head outputs, input ``input``
  (N, 3, H, W), outputs ``cls_score_{l}`` (N, A*C, H_l, W_l) and ``bbox_pred_{l}``
  (N, A*4, H_l, W_l) per FPN level ``l`` (plus ``score_factor_{l}`` for heads that have them).
  Anchor generation, box decoding, score thresholding and NMS are *not* in the graph: they
  run after onnxruntime through :func:`postprocess`, which calls mmdet's own
  ``bbox_head.predict_by_feat``, so the detections equal ``model.predict``'s.

The input is what the model's ``forward`` takes: the image after mmdet's test pipeline and the
``DetDataPreprocessor`` (resized, BGR->RGB, normalised by mean/std, zero-padded to a multiple
of 32): see :func:`preprocess_images`. Batch, height and width are dynamic axes.

Deploy mode (:func:`fuse_for_deploy`): ``model.eval()``, every backbone Conv+BN folded into one
conv (``EfficientViT.fuse``), and every ConvModule with a BatchNorm right after its conv in the
neck and head folded the same way.

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

The fused attention op (``efficientvit_det.ops``) is not in the graph: during export
``LocalWindowAttention.use_fused()`` is False, so the attention runs the plain PyTorch window
path (pad, partition into 7x7 windows, cascaded group attention, reverse, crop), which maps to
standard ONNX ops.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    'DEFAULT_OPSET', 'INPUT_NAME', 'HEAD_OUTPUT_GROUPS', 'BackboneOutputs', 'DetectorRawOutputs',
    'ExportResult', 'load_model', 'fuse_for_deploy', 'export_onnx', 'verify_onnx',
    'make_session', 'run_session', 'build_bbox_head', 'postprocess', 'preprocess_images',
    'other_verify_shape', 'read_metadata',
]

DEFAULT_OPSET = 17
INPUT_NAME = 'input'
# Output name prefixes, in the order a dense head's forward returns its per-level lists and
# ``predict_by_feat`` takes them.
HEAD_OUTPUT_GROUPS = ('cls_score', 'bbox_pred', 'score_factor')
_META_PREFIX = 'efficientvit_det.'


# --------------------------------------------------------------------------------------------
# building and loading
# --------------------------------------------------------------------------------------------
def _load_config(config: Union[str, Any], cfg_options: Optional[dict] = None):
    from mmengine.config import Config
    cfg = Config.fromfile(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_model(config: Union[str, Any], checkpoint: Optional[str] = None,
               cfg_options: Optional[dict] = None, backbone_only_checkpoint: str = 'auto'
               ) -> Tuple[nn.Module, Any]:
    """Build the detector from a config and load its weights; returns ``(model, cfg)``.

    Args:
        config: config file or ``Config``; ``custom_imports`` are honoured.
        checkpoint: a checkpoint file (an mmengine Runner checkpoint with ``state_dict``, or a
            bare state dict), loaded with ``torch.load(weights_only=True)`` and strict key
            matching. A checkpoint whose keys have no ``backbone.`` prefix (e.g. from
            ``tools/convert_checkpoint.py``) is loaded into the backbone alone. ``None`` or
            ``'none'`` keeps the random initial weights (for smoke tests and latency only).
        backbone_only_checkpoint: 'auto' (decide from the keys), 'yes' or 'no'.

    The backbone's ``init_cfg`` (ImageNet checkpoint) is never loaded here: the detector
    checkpoint holds every weight.
    """
    import efficientvit_det  # noqa: F401  (registers modules, weights-only allow-list)
    from mmengine.registry import init_default_scope
    from mmengine.runner.checkpoint import load_state_dict

    from mmdet.registry import MODELS

    cfg = _load_config(config, cfg_options)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = copy.deepcopy(cfg.model)
    if 'backbone' in model_cfg:
        model_cfg.backbone.pop('init_cfg', None)
    model = MODELS.build(model_cfg)

    if checkpoint is not None and str(checkpoint).lower() != 'none':
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
        state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, Mapping) else ckpt
        if not isinstance(state, Mapping):
            raise ValueError(f'{checkpoint}: no state dict found (got {type(state).__name__})')
        state = {k[7:] if k.startswith('module.') else k: v for k, v in state.items()}
        to_backbone = backbone_only_checkpoint == 'yes' or (
            backbone_only_checkpoint == 'auto' and not any(k.startswith('backbone.') for k in state))
        target = model.backbone if to_backbone else model
        load_state_dict(target, dict(state), strict=True)
        meta = ckpt.get('meta', {}) if isinstance(ckpt, Mapping) else {}
        if isinstance(meta, Mapping) and meta.get('dataset_meta'):
            model.dataset_meta = dict(meta['dataset_meta'])
    model.cfg = cfg
    return model.eval(), cfg


@torch.no_grad()
def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """conv <- bn(conv(x)) in place (BN in eval mode: running statistics)."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter(bias * scale + shift)


@torch.no_grad()
def fuse_for_deploy(model: nn.Module) -> nn.Module:
    """Put ``model`` (a detector or a bare backbone) in deploy mode, in place; returns it.

    ``eval()``; the backbone's ``fuse()`` (every Conv+BN of EfficientViT folded); every
    ``ConvModule`` of the rest whose BatchNorm directly follows its conv folded into the conv.
    A BatchNorm that cannot be folded (none in the RetinaNet configs) stays and runs in eval
    mode, which is still exact.
    """
    from mmcv.cnn import ConvModule
    model.eval()
    backbone = getattr(model, 'backbone', model)
    if hasattr(backbone, 'fuse'):
        backbone.fuse()
    for m in model.modules():
        if isinstance(m, ConvModule) and m.with_norm \
                and isinstance(m.norm, nn.modules.batchnorm._BatchNorm) \
                and type(m.conv) is nn.Conv2d and m.norm.track_running_stats \
                and m.order.index('norm') == m.order.index('conv') + 1:
            _fold_bn_into_conv(m.conv, m.norm)
            setattr(m, m.norm_name, nn.Identity())
            m.with_norm = False
    return model.eval()


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
    """Export ``model`` (already in deploy mode: see :func:`fuse_for_deploy`) to ONNX.

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
    import onnx

    if backbone_only:
        module = BackboneOutputs(getattr(model, 'backbone', model))
        names = module.output_names()
        mode = 'backbone'
    else:
        module = DetectorRawOutputs(model)
        mode = 'detector'
    module.eval()
    h, w = int(shape[0]), int(shape[1])
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, 3, h, w, generator=g)
    with torch.no_grad():
        if backbone_only:
            outs = module(example)
        else:
            groups = module.raw(example)
            names = _head_output_names(len(groups), len(groups[0]))
            outs = [t for group in groups for t in group]
    if len(outs) != len(names):
        raise RuntimeError(f'{len(outs)} outputs but {len(names)} names')

    dynamic_axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
    for i, n in enumerate(names):
        dynamic_axes[n] = {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'}
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    tmp = f'{out_file}.tmp{os.getpid()}'
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            warnings.filterwarnings('ignore', category=FutureWarning)
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            torch.onnx.export(module, (example,), tmp, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(tmp)
        meta = {'mode': mode, 'input_name': INPUT_NAME, 'output_names': names,
                'num_levels': len(names) if backbone_only else len(names) // len(groups),
                'export_shape': [batch_size, 3, h, w],
                'input': 'image after the test pipeline and DetDataPreprocessor '
                         '(RGB, (x - mean) / std, zero-padded to the size divisor), NCHW float32'}
        meta.update(metadata or {})
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = _META_PREFIX + k, json.dumps(v)
        proto.producer_name = 'efficientvit_det'
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    result = ExportResult(out_file, mode, INPUT_NAME, names, (batch_size, 3, h, w), opset)
    if verify_shapes is None:
        verify_shapes = [(h, w), other_verify_shape((h, w))]
    if verify_shapes:
        result.verification = verify_onnx(out_file, module, verify_shapes, rel_tol=rel_tol,
                                          batch_size=batch_size, seed=seed + 1)
    return result


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


# --------------------------------------------------------------------------------------------
# pre- and post-processing
# --------------------------------------------------------------------------------------------
def build_bbox_head(cfg) -> nn.Module:
    """The dense head of ``cfg.model`` with its ``test_cfg``: all :func:`postprocess` needs
    (anchor generator, box coder, NMS settings; no weights are used)."""
    import efficientvit_det  # noqa: F401
    from mmengine.registry import init_default_scope

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
    import efficientvit_det  # noqa: F401
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope

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
