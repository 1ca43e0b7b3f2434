"""RetinaNet end-to-end inference per image, and a training step: EfficientViT next to R50.

    python -m benchmarks detector            # m4, r50: eval fp32 / deploy / the default form
    python -m benchmarks detector --models m4 m4+deploy m4+auto m4+bf16 r50 r50+auto
    python -m benchmarks train-step --models m4 r50 --batch 2 --shape 800 1344

Models: ``m0``..``m5`` (our ``configs/retinanet_efficientvit_<arch>_coco.py``), ``r50`` (mmdet's
own ``retinanet_r50_fpn_1x_coco.py`` from the installed wheel) or a config path, each with
optional flags joined by ``+``:

Without ``+deploy``, ``+bf16`` or ``+auto`` the model runs as built (eval mode, fp32). Those
three put it in the inference form that ``tools/infer.py`` and ``tools/test.py`` run, through
the same call (:func:`efficientvit_det.inference.prepare_inference`):

``+deploy``   deploy mode, fp32 (``tools/infer.py --precision fp32``).
``+bf16``     bf16 autocast + channels_last (``--precision bf16``), deploy mode.
``+auto``     the project's default (``tools/infer.py`` as it is): deploy mode and the
              precision ``auto`` picks on this machine (bf16 on CPUs with native bf16).
``+module``   EfficientViT with ``attn_backend='module'``, the original's module path (default:
              the config's, ``auto``).
``+fused``    EfficientViT with ``attn_backend='fused'``.
``+cp``       activation checkpointing in the backbone (``with_cp=True``; training).

Inference (``detector``): an in-memory uint8 image (default 800x1333, which the COCO test
pipeline keeps at 800x1333 and the data preprocessor pads to 800x1344) through
``mmdet.apis.inference_detector`` -- test pipeline, normalisation/padding, backbone, neck,
head, box decoding and NMS: the whole per-image cost. The same work split in parts (``pre``:
pipeline + data preprocessor; ``backbone``; ``neck+head``: tensor forward; ``post``:
``predict_by_feat``, i.e. decoding, top-k, NMS) is timed in the same interleaved loop.

The table gives each row's precision, deploy mode and layout, and its speed-up over the first
row of the same base model (e.g. ``m4+auto`` over ``m4``); the CPU's bf16 capability
(AMX-BF16, AVX512-BF16) and what ``--precision auto`` picks on it are printed under the table.
Rows without ``+bf16`` must give the same outputs as the first row (``--tol``); bf16 rows report
their deviation, which is rounding, not a bug (see ``docs/precision.md`` for the accuracy).

Weights are random (nothing can be downloaded here): every parameter randomised and the BN
statistics calibrated on one batch, identical for the variants of one arch. ``--cls-bias``
decides what post-processing sees. ``prior`` (default): the classification layer's bias is
set to the focal-loss prior (p = 0.01, as mmdet initialises RetinaNet and as a trained
detector behaves: most anchors score far below ``score_thr=0.05``); a few percent of the
anchors still pass the threshold. ``random``: the bias stays random, so nearly every one of
the ~2.4M anchor-class scores of an 800x1344 image passes ``score_thr``, and mmdet's
``filter_scores_and_topk`` sorts them all: the worst case, which on 2 CPU cores costs more
than the network itself.

Training (``train-step``): ``model.train_step`` (data preprocessor, forward, focal + L1 losses,
backward, AdamW step) on a batch of random images with 5 random boxes each, timed interleaved;
peak memory per model in a fresh subprocess on CPU (peak RSS above the RSS after building the
model, data and optimizer) or ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from benchmarks.common import (
    Progress,
    add_common_args,
    build_detector_from_config,
    fmt_ms,
    format_table,
    peak_memory,
    report,
    run_isolated,
    setup_from_args,
    time_interleaved,
)
from efficientvit_det.cli import quiet_console
from efficientvit_det.cpu import cpu_info
from efficientvit_det.inference import Precision, prepare_inference, resolve_precision
from efficientvit_det.testing import calibrate_bn_, max_rel_err, randomize_

FLAGS = ('deploy', 'bf16', 'auto', 'module', 'fused', 'cp')
DEFAULT_MODELS = ('m4', 'm4+deploy', 'm4+auto', 'r50', 'r50+deploy', 'r50+auto')
PARTS = ('pre', 'backbone', 'neck+head', 'post')


def parse_model(spec: str) -> Tuple[str, Tuple[str, ...]]:
    base, *flags = spec.split('+')
    bad = [f for f in flags if f not in FLAGS]
    if bad or not base:
        raise argparse.ArgumentTypeError(
            f'model {spec!r}: base m0..m5, r50 or a config path, flags from {FLAGS} joined by +')
    return base, tuple(flags)


def inference_form(flags: Sequence[str]) -> Optional[Tuple[str, bool]]:
    """``(precision, deploy)`` for :func:`prepare_inference`, or None: the model as built."""
    if 'auto' in flags:
        return 'auto', True
    if 'bf16' in flags:
        return 'bf16', True
    if 'deploy' in flags:
        return 'fp32', True
    return None


def _is_evit(model: nn.Module) -> bool:
    return type(model.backbone).__name__ == 'EfficientViT'


def _set_cls_bias_prior_(model: nn.Module, prior_prob: float = 0.01) -> None:
    """Focal-loss prior on the head's classification bias (RetinaHead's ``retina_cls``)."""
    from mmengine.model import bias_init_with_prob
    cls = getattr(model.bbox_head, 'retina_cls', None)
    if cls is None or cls.bias is None:
        raise ValueError(f'--cls-bias prior: {type(model.bbox_head).__name__} has no '
                         f'retina_cls bias; use --cls-bias random')
    with torch.no_grad():
        cls.bias.fill_(bias_init_with_prob(prior_prob))


def build_model(spec: str, device: torch.device, seed: int = 0, calib_hw=(320, 480),
                train: bool = False, cache: Optional[dict] = None,
                cls_bias: str = 'prior') -> Tuple[nn.Module, Precision]:
    """A detector for ``spec`` and the precision it runs in; variants of one base share
    randomised, BN-calibrated weights.

    ``train=True``: mmdet's own initialisation (``init_weights``), train mode, no deploy.
    """
    base, flags = parse_model(spec)
    attn = 'module' if 'module' in flags else 'fused' if 'fused' in flags else None
    opts = {'model.backbone.with_cp': True} if 'cp' in flags else None
    if train:
        model = build_detector_from_config(base, 'cpu', attn_backend=attn, cfg_options=opts)
        torch.manual_seed(seed)
        quiet_console()  # init_weights logs one INFO block per parameter (thousands of lines)
        model.init_weights()
        model.train()
    else:
        key = (base, 'cp' in flags)
        if cache is not None and key in cache:
            model = copy.deepcopy(cache[key])
        else:
            model = build_detector_from_config(base, 'cpu', cfg_options=opts)
            randomize_(model, seed)
            if cls_bias == 'prior':
                _set_cls_bias_prior_(model)
            x = torch.randn(1, 3, *calib_hw, generator=torch.Generator().manual_seed(seed + 7))
            backend = model.backbone.attn_backend if _is_evit(model) else None
            if backend:  # BNs train while calibrating: the module path
                model.backbone.set_attn_backend('module')
            calibrate_bn_(model, lambda: model._forward(x))
            if backend:
                model.backbone.set_attn_backend(backend)
            if cache is not None:
                cache[key] = copy.deepcopy(model)
        if attn is not None:
            model.backbone.set_attn_backend(attn)
        model.eval()
    model = model.to(device)
    form = None if train else inference_form(flags)
    if form is None:
        return model, resolve_precision('fp32', device)
    return model, prepare_inference(model, *form, log=False)


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------
def _test_pipeline(model: nn.Module, test_scale: Optional[Tuple[int, int]]):
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg
    cfg = copy.deepcopy(model.cfg)
    pipeline = get_test_pipeline_cfg(cfg)
    pipeline[0].type = 'mmdet.LoadImageFromNDArray'
    for t in pipeline:
        if test_scale is not None and t.type.split('.')[-1] == 'Resize':
            t.scale = tuple(test_scale)
    cfg.test_dataloader.dataset.pipeline = pipeline
    return cfg, Compose(pipeline)


class InferenceCases:
    """The end-to-end call and its parts for one model and one image."""

    def __init__(self, model: nn.Module, img: np.ndarray, test_scale: Optional[Tuple[int, int]],
                 precision: Precision):
        from mmdet.apis import inference_detector
        self.model, self.img, self.precision = model, img, precision
        # a fresh context per call: what tools/infer.py wraps around DetInferencer
        self.amp = precision.autocast
        cfg, self.pipeline = _test_pipeline(model, test_scale)
        model.cfg = cfg  # inference_detector builds its pipeline from model.cfg
        self._inference_detector = inference_detector
        with torch.inference_mode(), self.amp():
            self.batch = self.pre()
            self.inputs = self.batch['inputs']
            self.feats = model.backbone(self.inputs)
            self.outs = model.bbox_head(model.neck(self.feats))

    def e2e(self):
        with torch.inference_mode(), self.amp():
            return self._inference_detector(self.model, self.img)

    def pre(self):
        data = self.pipeline(dict(img=self.img, img_id=0))
        data = dict(inputs=[data['inputs']], data_samples=[data['data_samples']])
        return self.model.data_preprocessor(data, False)

    def backbone(self):
        with torch.inference_mode(), self.amp():
            return self.model.backbone(self.inputs)

    def neck_head(self):
        with torch.inference_mode(), self.amp():
            return self.model.bbox_head(self.model.neck(self.feats))

    def post(self):
        with torch.inference_mode(), self.amp():
            samples = self.batch['data_samples']
            metas = [s.metainfo for s in samples]
            res = self.model.bbox_head.predict_by_feat(*self.outs, batch_img_metas=metas, rescale=True)
            return self.model.add_pred_to_datasample(samples, res)

    def manual(self):
        """pre -> backbone -> neck+head -> post in one go (for the equality check)."""
        with torch.inference_mode(), self.amp():
            batch = self.pre()
            outs = self.model.bbox_head(self.model.neck(self.model.backbone(batch['inputs'])))
            metas = [s.metainfo for s in batch['data_samples']]
            return self.model.bbox_head.predict_by_feat(*outs, batch_img_metas=metas, rescale=True)[0]

    def cases(self, breakdown: bool) -> Dict[str, Callable[[], Any]]:
        out = {'e2e': self.e2e}
        if breakdown:
            out.update({'pre': self.pre, 'backbone': self.backbone, 'neck+head': self.neck_head,
                        'post': self.post})
        return out


def _dets_equal(a, b) -> float:
    """max rel err between two InstanceData results (inf if they hold different boxes)."""
    if len(a.bboxes) != len(b.bboxes) or not torch.equal(a.labels.cpu(), b.labels.cpu()):
        return float('inf')
    return max(max_rel_err(a.bboxes, b.bboxes), max_rel_err(a.scores, b.scores)) if len(a.bboxes) else 0.


def run_inference(models: Sequence[str], device: torch.device, height: int = 800, width: int = 1333,
                  test_scale: Optional[Tuple[int, int]] = None, repeats: int = 5, warmup: int = 1,
                  seed: int = 0, breakdown: bool = True, tol: float = 1e-3,
                  progress: Optional[Progress] = None, cls_bias: str = 'prior') -> Dict[str, Any]:
    progress = progress or Progress(enabled=False)
    img = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    cache: dict = {}
    built: Dict[str, InferenceCases] = {}
    for spec in models:
        progress.update(f'[detector] building {spec}', force=True)
        model, precision = build_model(spec, device, seed, cache=cache, cls_bias=cls_bias)
        built[spec] = InferenceCases(model, img, test_scale, precision)
    cache.clear()

    checks: Dict[str, Any] = {}
    for spec, ic in built.items():
        progress.update(f'[detector] checking {spec}', force=True)
        e2e = ic.e2e().pred_instances
        checks[spec] = dict(num_dets=len(e2e.bboxes), input_shape=list(ic.inputs.shape),
                            manual_vs_e2e_max_rel_err=_dets_equal(ic.manual(), e2e))
        base = parse_model(spec)[0]
        ref = next((s for s in models if parse_model(s)[0] == base), spec)
        if ref != spec:  # same weights: compare the raw head outputs with the first variant
            a = [t for lvl in ic.outs for t in lvl]
            b = [t for lvl in built[ref].outs for t in lvl]
            checks[spec]['head_outputs_vs'] = ref
            checks[spec]['head_outputs_max_rel_err'] = max_rel_err(a, b)
    for spec, c in checks.items():
        # bf16 rounds by design: its deviation is reported, not held to the fp32 tolerance
        approx = built[spec].precision.name == 'bf16'
        c['outputs_equal'] = c['manual_vs_e2e_max_rel_err'] <= tol and \
            (approx or c.get('head_outputs_max_rel_err', 0.) <= tol)

    cases = {}
    for spec, ic in built.items():
        for part, fn in ic.cases(breakdown).items():
            cases[f'{spec} {part}'] = fn
    heaviest = max(built, key=lambda s: 0 if _is_evit(built[s].model) else 1)
    stats = time_interleaved(cases, repeats, warmup, device, progress, label='detector',
                             allocator_warmup=built[heaviest].e2e)
    progress.done()
    results = []
    for spec in models:
        precision = built[spec].precision
        r = dict(model=spec, precision=precision.name,
                 deploy=inference_form(parse_model(spec)[1]) is not None,
                 channels_last=precision.channels_last,
                 e2e=stats[f'{spec} e2e'], **checks[spec])
        if breakdown:
            r['parts'] = {p: stats[f'{spec} {p}'] for p in PARTS}
        first = next(s for s in models if parse_model(s)[0] == parse_model(spec)[0])
        r['speedup_vs_first_of_base'] = stats[f'{first} e2e']['median_ms'] / r['e2e']['median_ms']
        r['first_of_base'] = first
        results.append(r)
    ref_r50 = next((r for r in results if parse_model(r['model'])[0] == 'r50'), None)
    if ref_r50 is not None:
        for r in results:
            r['speedup_vs_r50'] = ref_r50['e2e']['median_ms'] / r['e2e']['median_ms']
    return dict(benchmark='detector', image_hw=[height, width], test_scale=test_scale, cls_bias=cls_bias,
                models=list(models), results=results, tolerance=tol,
                all_outputs_equal=all(c['outputs_equal'] for c in checks.values()),
                cpu=cpu_info().describe(),
                auto_precision=resolve_precision('auto', device).summary())


def render_inference(payload: Dict[str, Any]) -> str:
    rows = []
    for r in payload['results']:
        parts = r.get('parts', {})
        speedup = r.get('speedup_vs_first_of_base')
        rows.append((r['model'], r.get('precision', 'fp32'), 'yes' if r.get('deploy') else 'no',
                     'yes' if r.get('channels_last') else 'no', fmt_ms(r['e2e']),
                     *(f"{parts[p]['median_ms']:.1f}" if p in parts else '-' for p in PARTS),
                     f'{speedup:.2f}x' if speedup is not None else '-',
                     f"{r['speedup_vs_r50']:.2f}x" if 'speedup_vs_r50' in r else '-',
                     r['num_dets'],
                     f"{max(r['manual_vs_e2e_max_rel_err'], r.get('head_outputs_max_rel_err', 0.)):.1e}"))
    h, w = payload['image_hw']
    table = format_table(['model', 'precision', 'deploy', 'channels_last',
                          'end-to-end ms: median (IQR)', *(f'{p} ms' for p in PARTS),
                          'speed-up vs 1st row of model', 'speed-up vs r50', 'dets',
                          'max rel err'], rows)
    lines = [table, f"image {h}x{w} uint8 in memory -> network input "
                    f"{payload['results'][0]['input_shape']}; outputs equal (fp32 rows; bf16 "
                    f"rows: deviation shown): {payload['all_outputs_equal']}"]
    if 'cpu' in payload:
        lines.append(f"CPU: {payload['cpu']}; --precision auto -> {payload['auto_precision']}")
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# training step
# --------------------------------------------------------------------------------------------
def make_train_batch(batch: int, height: int, width: int, seed: int = 0, boxes: int = 5,
                     num_classes: int = 80) -> Dict[str, Any]:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8))
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([width * .7, height * .7])
        wh = (torch.rand(boxes, 2, generator=g) * .25 + .05) * torch.tensor([width, height])
        s = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                        pad_shape=(height, width), scale_factor=(1., 1.),
                                        img_id=len(samples)))
        s.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                      labels=torch.randint(0, num_classes, (boxes,), generator=g))
        s.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


class TrainStep:
    def __init__(self, spec: str, device: torch.device, batch: int, height: int, width: int,
                 seed: int = 0):
        from mmengine.optim import OptimWrapper
        self.model = build_model(spec, device, seed, train=True)[0]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = OptimWrapper(torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999),
                                                    weight_decay=0.05))
        self.data = make_train_batch(batch, height, width, seed)
        self.losses: List[float] = []

    def __call__(self):
        log_vars = self.model.train_step(self.data, self.optim)
        self.losses.append(float(torch.as_tensor(log_vars['loss']).detach()))
        return log_vars


def _train_memory_child(spec: str, batch: int, height: int, width: int, steps: int, seed: int,
                        device: str, threads: Optional[int] = None) -> Dict[str, Any]:
    """Subprocess body: build, then peak memory over ``steps`` training steps."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    step = TrainStep(spec, dev, batch, height, width, seed)
    mem = peak_memory(lambda: [step() for _ in range(steps)], dev)
    mem['steps'] = steps
    mem['losses'] = step.losses
    return mem


def run_train_step(models: Sequence[str], device: torch.device, batch: int = 2, height: int = 800,
                   width: int = 1344, repeats: int = 3, warmup: int = 1, seed: int = 0,
                   memory: bool = True, memory_steps: int = 2,
                   progress: Optional[Progress] = None) -> Dict[str, Any]:
    progress = progress or Progress(enabled=False)
    mem: Dict[str, Any] = {}
    if memory:  # first, in fresh processes (CPU) so nothing else has touched the heap
        for spec in models:
            progress.update(f'[train-step] peak memory of {spec} ({memory_steps} steps)', force=True)
            if device.type == 'cpu':
                mem[spec] = run_isolated('benchmarks.detector:_train_memory_child',
                                         spec=spec, batch=batch, height=height, width=width,
                                         steps=memory_steps, seed=seed, device='cpu',
                                         threads=torch.get_num_threads())
            else:
                mem[spec] = _train_memory_child(spec, batch, height, width, memory_steps, seed,
                                                str(device))
    steps = {}
    for spec in models:
        progress.update(f'[train-step] building {spec}', force=True)
        steps[spec] = TrainStep(spec, device, batch, height, width, seed)
    stats = time_interleaved(dict(steps), repeats, warmup, device, progress, label='train-step')
    progress.done()
    results = []
    for spec in models:
        losses = steps[spec].losses
        results.append(dict(model=spec, step=stats[spec], imgs_per_s=batch / (stats[spec]['median_ms'] / 1e3),
                            losses=losses, losses_finite=all(np.isfinite(losses)),
                            trainable_params=sum(p.numel() for p in steps[spec].model.parameters()
                                                 if p.requires_grad),
                            memory=mem.get(spec)))
    ref = next((r for r in results if parse_model(r['model'])[0] == 'r50'), None)
    if ref is not None:
        for r in results:
            r['speedup_vs_r50'] = ref['step']['median_ms'] / r['step']['median_ms']
    return dict(benchmark='train-step', batch=batch, input_hw=[height, width], models=list(models),
                optimizer='AdamW lr 1e-4 wd 0.05', results=results,
                all_losses_finite=all(r['losses_finite'] for r in results))


def render_train(payload: Dict[str, Any]) -> str:
    rows = []
    for r in payload['results']:
        m = r['memory'] or {}
        rows.append((r['model'], fmt_ms(r['step']), f"{r['imgs_per_s']:.2f}",
                     f"{r['speedup_vs_r50']:.2f}x" if 'speedup_vs_r50' in r else '-',
                     f"{m['peak_delta_mb']:.0f}" if m.get('peak_delta_mb') is not None else '-',
                     f"{m['peak_mb']:.0f}" if m.get('peak_mb') is not None else '-',
                     f"{r['trainable_params'] / 1e6:.1f}M"))
    b, (h, w) = payload['batch'], payload['input_hw']
    method = next((r['memory']['method'] for r in payload['results'] if r['memory']), 'not measured')
    return (format_table(['model', 'train step ms: median (IQR)', 'img/s', 'speed-up vs r50',
                          'peak mem above baseline MiB', 'peak mem MiB', 'trainable params'], rows)
            + f'\nbatch {b} x {h}x{w}; {payload["optimizer"]}; memory: {method}; '
              f'losses finite: {payload["all_losses_finite"]}')


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _check_models(models: Sequence[str]) -> List[str]:
    for m in models:
        try:
            parse_model(m)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(str(e)) from None
    return list(models)


def build_inference_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='benchmark.py detector', description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS),
                        help='default: %(default)s')
    parser.add_argument('--shape', nargs=2, type=int, default=(800, 1333), metavar=('H', 'W'),
                        help='the in-memory image (default: %(default)s)')
    parser.add_argument('--test-scale', nargs=2, type=int, default=None, metavar=('W', 'H'),
                        help="override the test pipeline's Resize scale (default: the config's, "
                             "(1333, 800))")
    parser.add_argument('--no-breakdown', action='store_true', help='time end-to-end only')
    parser.add_argument('--cls-bias', choices=('prior', 'random'), default='prior',
                        help='classification bias: focal-loss prior (realistic candidate counts) '
                             'or random (worst-case post-processing); default: %(default)s')
    parser.add_argument('--tol', type=float, default=1e-3,
                        help='max relative error for outputs to count as equal (default: %(default)s)')
    add_common_args(parser, repeats=5, warmup=1)
    return parser


def main_inference(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_inference_parser().parse_args(argv)
    device = setup_from_args(args)
    payload = run_inference(_check_models(args.models), device, *args.shape,
                            test_scale=args.test_scale, repeats=args.repeats, warmup=args.warmup,
                            seed=args.seed, breakdown=not args.no_breakdown, tol=args.tol,
                            progress=Progress(not args.quiet), cls_bias=args.cls_bias)
    return report(payload, args, device, render_inference)


def build_train_parser(parser=None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog='benchmark.py train-step', description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['m4', 'r50'])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--shape', nargs=2, type=int, default=(800, 1344), metavar=('H', 'W'),
                        help='padded network input size (default: %(default)s)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory runs')
    parser.add_argument('--memory-steps', type=int, default=2,
                        help='training steps in the peak-memory run (default: %(default)s; the '
                             'first one creates the AdamW state)')
    add_common_args(parser, repeats=3, warmup=1)
    return parser


def main_train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_train_parser().parse_args(argv)
    device = setup_from_args(args)
    payload = run_train_step(_check_models(args.models), device, args.batch, *args.shape,
                             repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                             memory=not args.no_memory, memory_steps=args.memory_steps,
                             progress=Progress(not args.quiet))
    return report(payload, args, device, render_train)


main = main_inference

if __name__ == '__main__':
    main_inference()
