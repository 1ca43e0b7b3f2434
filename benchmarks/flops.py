"""Parameters and FLOPs of the EfficientViT family and of detectors, without a dataset.

    python -m benchmarks flops                              # all archs + RetinaNet-m4
    python -m benchmarks flops --arch m4 --shape 224 224
    python -m benchmarks flops --detector configs/retinanet_efficientvit_m4_coco.py --shape 800 1344
    python -m benchmarks flops --detector configs/*.py --shape 512 --convention mmengine

Every detector config of the project works (two-stage and DETR-style ones get the image metas
their ``_forward`` reads). ``--convention mmengine`` counts as mmdet's
``tools/analysis_tools/get_flops.py`` does (mmengine's default handles, norms included); the
fused attention op is counted like its reference path either way, so the count does not depend
on ``--attn-backend`` (``efficientvit_det/models/complexity.py``). Two-stage detectors: the
tensor forward (as in ``get_flops.py``) runs the RoI heads, mask heads included, on every
proposal the RPN keeps for the (fixed pseudo-random) input, at most ``test_cfg.rpn.max_per_img``
(``--cfg-options model.test_cfg.rpn.max_per_img=N`` to count N). DINO needs at least
``num_queries`` (900) encoder tokens: inputs of about 224 px or more.

FLOPs here are **multiply-accumulates** (MACs: one fused multiply-add = 1) of convolutions,
linear layers and matrix products -- the attention's ``q^T k`` and ``v attn^T`` included -- the
convention of the EfficientViT paper (m4: 299M at 224) and of fvcore / mmengine's
``FlopAnalyzer``. BatchNorm is not counted (it folds into the convs at inference), nor are
element-wise ops (ReLU, softmax, residual adds, pooling).

Two independent counts are given for the backbones:

* ``analyzer``: mmengine's :class:`~mmengine.analysis.FlopAnalyzer` (jit trace; counts
  ``aten::_convolution``, ``aten::linear``/``addmm`` and ``aten::matmul``/``bmm``);
* ``hand``: :func:`hand_count_macs`, a closed-form count from the architecture description
  (docs/facts.md, "Model family"), which needs no model at all.

Two window semantics exist:

* classification (the paper's numbers, timm ``img_size=224``): the window is
  ``min(7, feature size)``, so stage 3 at 224 px (4x4) attends over 16 tokens;
* detection (this backbone, the original detection code): the window is always 7 and maps
  are zero-padded to a multiple of 7, so stage 3 at 224 px attends over a padded 7x7 window
  and its qkv/projection convs also run on the padding.
"""
from __future__ import annotations

import argparse
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import DictAction
from torch import Tensor, nn

from benchmarks.common import (
    build_detector_from_config,
    format_table,
    report,
    resolve_detector_config,
)

# The paper's Table (ImageNet-1k at 224, classification model with its 1000-class head).
PAPER = {
    'm0': dict(params_m=2.3, flops_m=79), 'm1': dict(params_m=3.0, flops_m=167),
    'm2': dict(params_m=4.2, flops_m=201), 'm3': dict(params_m=6.9, flops_m=263),
    'm4': dict(params_m=8.8, flops_m=299), 'm5': dict(params_m=12.4, flops_m=522),
}
ARCHS = tuple(PAPER)


# --------------------------------------------------------------------------------------------
# hand count
# --------------------------------------------------------------------------------------------
def _half(n: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1."""
    return (n - 1) // 2 + 1


def hand_count_macs(arch: str, height: int, width: int, classifier: bool = False,
                    num_classes: int = 1000, window: str = 'detection') -> Dict[str, int]:
    """Closed-form MACs of an EfficientViT (convs + linear + attention matmuls), per part.

    ``window='classification'`` uses ``min(7, map size)`` windows (square maps: the paper's
    setting); ``'detection'`` always 7x7 windows with zero padding (this backbone).
    """
    from efficientvit_det.archs import resolve_arch
    s = resolve_arch(arch)
    dims, depths, heads, kernels = s['embed_dims'], s['depths'], s['num_heads'], s['kernels']
    kd, ws = s.get('key_dim', 16), s.get('window_size', 7)
    parts: Dict[str, int] = {}

    h, w = height, width
    chans = (3, dims[0] // 8, dims[0] // 4, dims[0] // 2, dims[0])
    stem = 0
    for i in range(4):
        h, w = _half(h), _half(w)
        stem += h * w * chans[i + 1] * chans[i] * 9
    parts['stem'] = stem

    def dw(hw, c):
        return hw * c * 9

    def ffn(hw, c):
        return 2 * hw * c * (2 * c)

    def attention(hh, ww, c, nh):
        if window == 'classification':
            win_h, win_w = min(ws, hh), min(ws, ww)
        else:
            win_h = win_w = ws
        ph, pw = math.ceil(hh / win_h) * win_h, math.ceil(ww / win_w) * win_w
        tokens, n = ph * pw, win_h * win_w
        windows = tokens // n
        vd = c // nh
        macs = nh * tokens * (c // nh) * (2 * kd + vd)               # per-head qkv 1x1 conv
        macs += sum(tokens * kd * k * k for k in kernels[:nh])      # depthwise conv on q
        macs += nh * windows * n * n * (kd + vd)                     # q^T k and v attn^T
        macs += tokens * (vd * nh) * c                               # output projection
        return macs

    def block(hh, ww, c, nh):
        hw = hh * ww
        return 2 * dw(hw, c) + 2 * ffn(hw, c) + attention(hh, ww, c, nh)

    for i in range(3):
        c = dims[i]
        macs = 0
        if i > 0:
            cin, hid = dims[i - 1], dims[i - 1] * 4
            macs += dw(h * w, cin) + ffn(h * w, cin)                 # res1
            macs += h * w * cin * hid                                # PatchMerging conv1
            h, w = _half(h), _half(w)
            rd = max(8, int(hid * 0.25 + 4) // 8 * 8)
            macs += h * w * hid * 9 + 2 * hid * rd + h * w * hid * c  # dw s2, SE, conv3
            macs += dw(h * w, c) + ffn(h * w, c)                     # res2
        for _ in range(depths[i]):
            macs += block(h, w, c, heads[i])
        parts[f'stage{i + 1}'] = macs
    if classifier:
        parts['head'] = dims[2] * num_classes
    parts['total'] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------
# analyzer
# --------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _zero(inputs, outputs) -> int:
    return 0


CONVENTIONS = ('macs', 'mmengine')


def analyze(model: nn.Module, inputs: Tuple[Tensor, ...], convention: str = 'macs') -> Dict[str, Any]:
    """FLOPs with mmengine's FlopAnalyzer (jit trace).

    ``convention='macs'``: multiply-adds of conv, linear, matmul/bmm; no BN, no element-wise.
    ``'mmengine'``: mmengine's default handles as they are (norms, pooling, upsampling and
    grid sampling counted too), what mmdet's ``tools/analysis_tools/get_flops.py`` reports.
    The fused attention op (``efficientvit_det::cga``) is counted like the reference path in
    both (:mod:`efficientvit_det.models.complexity`).
    """
    from mmengine.analysis import FlopAnalyzer

    from efficientvit_det.models.complexity import CGA_OP, cga_macs_jit
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fa = FlopAnalyzer(model, inputs)
        if convention == 'macs':
            # Not MACs: BN folds into the convs at inference; pooling/upsampling are
            # element-wise. (set_op_handle(name, None) does not drop a default handle in
            # mmengine 0.10: use a handle that counts nothing.)
            for op in ('aten::batch_norm', 'aten::adaptive_avg_pool2d',
                       'aten::upsample_nearest2d', 'aten::upsample_bilinear2d',
                       'aten::group_norm', 'aten::layer_norm', 'aten::instance_norm',
                       'aten::grid_sampler'):
                fa.set_op_handle(op, _zero)
            fa.set_op_handle(CGA_OP, cga_macs_jit)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        fa.tracer_warnings('none')
        total = fa.total()
        by_op = {k: v for k, v in fa.by_operator().items() if v}
        by_module = fa.by_module()
    return dict(total=int(total), by_operator={k: int(v) for k, v in by_op.items()},
                by_module=by_module)


def classification_model(arch: str, img_size: int = 224) -> nn.Module:
    """timm's classification EfficientViT (1000-class head): the paper's model."""
    import timm
    return timm.create_model(f'efficientvit_{arch}', img_size=img_size, num_classes=1000).eval()


def detection_backbone(arch: str) -> nn.Module:
    from efficientvit_det.models.backbones.efficientvit import EfficientViT
    return EfficientViT(arch, attn_backend='module').eval()


def backbone_report(arch: str, height: int, width: int) -> Dict[str, Any]:
    """Params and MACs of the classification model (at a square size) and of our backbone."""
    out: Dict[str, Any] = dict(arch=arch, height=height, width=width)
    x = torch.zeros(1, 3, height, width)
    bb = detection_backbone(arch)
    an = analyze(bb, (x,))
    hand = hand_count_macs(arch, height, width, window='detection')
    out['detection_backbone'] = dict(
        params=count_params(bb), macs=an['total'], macs_hand=hand['total'],
        macs_by_operator=an['by_operator'],
        macs_by_part_hand={k: v for k, v in hand.items() if k != 'total'},
        note='7x7 windows, zero-padded (this backbone / the original detection code)')
    if height == width:
        cls = classification_model(arch, height)
        an_c = analyze(cls, (x,))
        hand_c = hand_count_macs(arch, height, width, classifier=True, window='classification')
        out['classification'] = dict(
            params=count_params(cls), macs=an_c['total'], macs_hand=hand_c['total'],
            macs_by_operator=an_c['by_operator'],
            macs_by_part_hand={k: v for k, v in hand_c.items() if k != 'total'},
            params_backbone_plus_head=count_params(bb) + count_params(cls.head),
            note=f'timm efficientvit_{arch} img_size={height} with its 1000-class head '
                 f'(windows min(7, map size))')
        if arch in PAPER:
            p = PAPER[arch]
            out['classification'].update(
                paper_params_m=p['params_m'], paper_flops_m=p['flops_m'],
                params_rel_diff=count_params(cls) / (p['params_m'] * 1e6) - 1,
                macs_rel_diff=an_c['total'] / (p['flops_m'] * 1e6) - 1)
    return out


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------
class _DetectorTensors(nn.Module):
    """backbone + neck + head(s) on a batched tensor (no pre/post-processing): the detector's
    ``_forward``, with the image metas that two-stage and DETR-style detectors read (image
    and padded batch shape), as mmdet's ``get_flops.py`` passes its data samples."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.det = det

    def forward(self, x):
        from mmdet.structures import DetDataSample
        h, w = x.shape[-2:]
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
        return self.det._forward(x, [DetDataSample(metainfo=meta) for _ in range(len(x))])


def detector_input(height: int, width: int) -> Tensor:
    """A fixed pseudo-random normalised image: proposal counts of two-stage detectors (and so
    their RoI-head FLOPs) depend on the input; a constant image gives too few proposals."""
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))


DETECTOR_PARTS = ('backbone', 'neck', 'heads')


def detector_report(config: str, height: int, width: int, attn_backend: str = 'module',
                    convention: str = 'macs', cfg_options: Optional[dict] = None) -> Dict[str, Any]:
    """Params and FLOPs of a detector config at ``height x width`` (random weights), by part:
    backbone, neck and heads (everything else: RPN/RoI/box heads, a DETR's transformer).
    ``cfg_options``: as ``--cfg-options`` of mmdet's tools."""
    det = build_detector_from_config(config, attn_backend=attn_backend, cfg_options=cfg_options)
    an = analyze(_DetectorTensors(det), (detector_input(height, width),), convention)
    parts = {}
    for name in ('backbone', 'neck'):
        if getattr(det, name, None) is not None:
            parts[name] = dict(params=count_params(getattr(det, name)),
                               macs=int(an['by_module'].get(f'det.{name}', 0)))
    parts['heads'] = dict(params=count_params(det) - sum(p['params'] for p in parts.values()),
                          macs=an['total'] - sum(p['macs'] for p in parts.values()))
    return dict(config=resolve_detector_config(config), name=config, height=height, width=width,
                attn_backend=attn_backend, convention=convention, params=count_params(det),
                macs=an['total'], parts=parts, macs_by_operator=an['by_operator'])


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _m(v: float) -> str:
    return f'{v / 1e6:.2f}M'


def _g(v: float) -> str:
    return f'{v / 1e9:.1f}G'


def render(payload: Dict[str, Any]) -> str:
    out: List[str] = []
    cls_rows, det_rows = [], []
    for r in payload.get('backbones', []):
        d = r['detection_backbone']
        det_rows.append((r['arch'], f"{r['height']}x{r['width']}", _m(d['params']),
                         _m(d['macs']), _m(d['macs_hand']),
                         _m(d['macs_by_operator'].get('matmul', 0))))
        c = r.get('classification')
        if c:
            cls_rows.append((
                r['arch'], f"{r['height']}", _m(c['params']), _m(c['params_backbone_plus_head']),
                f"{c.get('paper_params_m', '-')}M", f"{c['params_rel_diff']:+.2%}" if 'params_rel_diff' in c else '-',
                _m(c['macs']), _m(c['macs_hand']), f"{c.get('paper_flops_m', '-')}M",
                f"{c['macs_rel_diff']:+.2%}" if 'macs_rel_diff' in c else '-'))
    if cls_rows:
        out.append('Classification model (the paper\'s setting: 1000-class head, windows min(7, map)):')
        out.append(format_table(
            ['arch', 'px', 'params (timm)', 'params (ours+head)', 'paper params', 'diff',
             'MACs (analyzer)', 'MACs (hand)', 'paper FLOPs', 'diff'], cls_rows))
    if det_rows:
        out.append('Detection backbone (ours: no head, 7x7 zero-padded windows, 3 stage outputs):')
        out.append(format_table(['arch', 'input HxW', 'params', 'MACs (analyzer)', 'MACs (hand)',
                                 'of which attention matmuls'], det_rows))
    drows = []
    for d in payload.get('detectors', []):
        p = d['parts']
        drows.append((d['name'], f"{d['height']}x{d['width']}", _m(d['params']), _g(d['macs']),
                       *(f"{_g(p[k]['macs'])} / {_m(p[k]['params'])}" if k in p else '-'
                         for k in DETECTOR_PARTS)))
    if drows:
        unit = 'MACs' if payload.get('convention', 'macs') == 'macs' else 'FLOPs (mmengine)'
        out.append('Detectors (tensor forward: backbone + neck + heads, no post-processing):')
        out.append(format_table(['detector', 'input HxW', 'params', unit,
                                 f'backbone {unit} / params', 'neck', 'heads'], drows))
    return '\n'.join(out)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='python -m benchmarks flops', description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', nargs='+', default=None,
                        help=f'backbone archs (default: all of {", ".join(ARCHS)} unless only '
                             f'--detector is given); "none" to skip')
    parser.add_argument('--shape', nargs='+', type=int, default=None, metavar='N',
                        help='input H W (or one N for NxN); default 224 224 for backbones and '
                             '800 1344 for detectors')
    parser.add_argument('--backbone-shapes', nargs='+', default=None, metavar='HxW',
                        help='several backbone input sizes, e.g. 224x224 800x1344')
    parser.add_argument('--detector', nargs='+', default=None,
                        help='detector configs, or m0..m5 (our RetinaNet configs) / r50 (mmdet '
                             'RetinaNet-R50); default with no --arch: m4 r50')
    parser.add_argument('--attn-backend', default='module',
                        help='attention backend of the detectors (the count is the same for '
                             'every backend; default module)')
    parser.add_argument('--convention', choices=CONVENTIONS, default='macs',
                        help='detectors: multiply-adds only (macs, default) or mmengine\'s '
                             'default counting, as mmdet\'s get_flops.py (mmengine)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override settings of every --detector config, as in mmdet\'s '
                             'tools, e.g. model.test_cfg.rpn.max_per_img=100')
    parser.add_argument('--json', metavar='FILE', default=None)
    return parser


def _shape(values: Optional[Sequence[int]], default: Tuple[int, int]) -> Tuple[int, int]:
    if not values:
        return default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise SystemExit('--shape takes H W or a single N')
    return values[0], values[1]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.arch is None:
        archs = list(ARCHS) if args.detector is None or args.shape is None else []
    else:
        archs = [] if args.arch == ['none'] else args.arch
    if args.backbone_shapes:
        bshapes = [tuple(int(v) for v in s.lower().split('x')) for s in args.backbone_shapes]
    else:
        bshapes = [_shape(args.shape, (224, 224))]
    detectors = args.detector if args.detector is not None else (
        ['m4', 'r50'] if args.arch is None else [])
    dshape = _shape(args.shape, (800, 1344))
    payload: Dict[str, Any] = dict(
        benchmark='flops', unit='MACs (multiply-accumulates) of conv, linear and matmul; BN and '
                                'element-wise ops not counted', backbones=[], detectors=[],
        convention=args.convention)
    if args.convention == 'mmengine':
        payload['detector_unit'] = ("mmengine's default FlopAnalyzer count (MACs plus norms, "
                                    'pooling and upsampling), as mmdet get_flops.py')
    for arch in archs:
        for h, w in bshapes:
            payload['backbones'].append(backbone_report(arch, h, w))
    for det in detectors:
        payload['detectors'].append(detector_report(det, *dshape, attn_backend=args.attn_backend,
                                                    convention=args.convention,
                                                    cfg_options=args.cfg_options))
    for d in payload['detectors']:
        d.pop('by_module', None)
    return report(payload, args, torch.device('cpu'), render)


if __name__ == '__main__':
    main()
