"""The built-in demo: synthetic dataset -> train RetinaNet-EfficientViT on CPU -> COCO mAP
-> detections drawn on validation images -> summary.  About 10 minutes on 2 CPU cores.

    python tools/demo.py                       # everything with the defaults
    python tools/demo.py --epochs 4            # shorter (lower mAP)
    python tools/demo.py --verbose             # mmengine's full log on the console

1. generates ``data/synthetic`` (2000 train / 200 val images of 128 px, seed 0, the
   ``normal`` preset) unless an identical copy is already there;
2. trains ``configs/retinanet_efficientvit_m0_demo.py`` (from scratch, CPU) into
   ``work_dirs/demo``, printing progress with an ETA;
3. evaluates COCO bbox mAP on the validation split;
4. detects objects in a few validation images (mmdet's DetInferencer), writing
   ``work_dirs/demo/infer/vis/*.jpg``, ``work_dirs/demo/infer/detections.json`` and one
   picture of them all, ``work_dirs/demo/detections_grid.jpg``;
5. prints a summary (mAP, what it means, timings, where the files are) and writes it to
   ``work_dirs/demo/summary.json``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time
from contextlib import contextmanager, redirect_stdout

from efficientvit_det.cli import known_warnings_silenced, quiet_console, run_tool

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))  # the checkout: its configs/
DEFAULT_CONFIG = osp.join(_ROOT, 'configs', 'retinanet_efficientvit_m0_demo.py')
GRID_COLUMNS, GRID_ZOOM = 4, 2  # the picture of the detections: 4 images a row, 2x enlarged


def parse_args(argv=None):
    from mmengine.config import DictAction

    from efficientvit_det.datasets.synthetic import PRESETS
    p = argparse.ArgumentParser(description='efficientvit_det demo on the synthetic dataset')
    p.add_argument('--config', default=DEFAULT_CONFIG)
    p.add_argument('--data-root', default='data/synthetic')
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--num-train', type=int, default=2000)
    p.add_argument('--num-val', type=int, default=200)
    p.add_argument('--size', type=int, default=128, help='image side of the dataset')
    p.add_argument('--seed', type=int, default=0, help='dataset and training seed')
    p.add_argument('--difficulty', default='normal', choices=sorted(PRESETS),
                   help='dataset preset (easy: few large unoccluded objects, no clutter; '
                   'hard: small objects, heavy clutter and occlusion)')
    p.add_argument('--epochs', type=int, default=None,
                   help='override the number of epochs of the config')
    p.add_argument('--num-vis', type=int, default=8,
                   help='validation images to draw the detections of')
    p.add_argument('--score-thr', type=float, default=0.5,
                   help='score threshold of the drawn / exported detections (on the demo '
                   'run: precision 0.87, recall 0.71 over the validation split)')
    p.add_argument('--device', default='cpu', help='inference device: cpu, cuda or auto')
    p.add_argument('--log-interval', type=int, default=50)
    p.add_argument('--verbose', action='store_true', help="show mmengine's full log")
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config entries, xxx=yyy format')
    return p.parse_args(argv)


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 60}:{seconds % 60:02d}'


@contextmanager
def _timed(timings: dict, key: str):
    t = time.time()
    yield
    timings[key] = time.time() - t


@contextmanager
def _quiet_stdout(quiet: bool):
    """Swallow what is printed (pycocotools' tables); logging keeps its own stream."""
    if not quiet:
        yield
        return
    with open(os.devnull, 'w') as devnull, redirect_stdout(devnull):
        yield


def warn_if_cpu_is_shared() -> None:
    """Timings assume the cores are ours: say so when other processes load them."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform
        return
    if load > cores * 0.75:
        print(f'  note: load average {load:.1f} on {cores} cores: other processes share the '
              'CPU, so this run takes longer than on an idle machine', flush=True)


def prepare_dataset(args) -> None:
    from efficientvit_det.datasets import dataset_is_complete, generate_dataset
    print(f'[1/4] dataset: {args.data_root} ({args.num_train} train / {args.num_val} val '
          f'images, {args.size} px, {args.difficulty})', flush=True)
    if dataset_is_complete(args.data_root, args.num_train, args.num_val, args.size,
                           args.seed, args.difficulty):
        print('  already generated (same parameters): reusing it')
    else:
        generate_dataset(args.data_root, args.num_train, args.num_val, args.size, args.seed,
                         args.difficulty)


def _set_resize_scale(pipeline, size):
    for t in pipeline:
        if t.get('type') == 'Resize':
            t['scale'] = (size, size)


def _set_epochs(cfg, epochs: int) -> None:
    """``epochs`` of training, the lr schedule stretched or shrunk to match."""
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = epochs
    for sched in cfg.param_scheduler:
        if sched.get('by_epoch', True) and sched.get('end', 0) > 1:
            sched['end'] = epochs
            if 'T_max' in sched:
                sched['T_max'] = epochs - sched.get('begin', 0)
            if 'milestones' in sched:
                sched['milestones'] = [max(epochs - 1, 1)]  # lr x0.1 for the last epoch


def build_config(args):
    from efficientvit_det.apis import load_config
    cfg = load_config(args.config, args.cfg_options)
    root = osp.abspath(args.data_root).rstrip('/') + '/'
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(key):
            cfg[key].dataset.data_root = root
            _set_resize_scale(cfg[key].dataset.pipeline, args.size)
    cfg.test_evaluator = dict(cfg.test_evaluator,
                              ann_file=osp.join(root, 'annotations', 'instances_val.json'),
                              classwise=True)
    # evaluate once, after training (runner.test below), not during it
    cfg.val_cfg = None
    cfg.val_dataloader = None
    cfg.val_evaluator = None
    if args.epochs is not None:
        _set_epochs(cfg, args.epochs)
    cfg.work_dir = args.work_dir
    cfg.randomness = dict(seed=args.seed)
    cfg.default_hooks.logger.interval = args.log_interval
    return cfg


def make_progress_hook(interval: int):
    from mmengine.hooks import Hook

    class DemoProgressHook(Hook):
        """Compact progress lines (iteration, loss, lr, elapsed, ETA) on stdout."""
        priority = 'VERY_LOW'

        def before_train(self, runner):
            self.t0 = time.time()
            self.start_iter = runner.iter

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            it, total = runner.iter + 1, runner.max_iters
            if it % interval and it != total:
                return
            hub = runner.message_hub
            loss = hub.get_scalar('train/loss').mean(interval)
            lr = hub.get_scalar('train/lr').current()
            elapsed = time.time() - self.t0
            eta = elapsed / max(it - self.start_iter, 1) * (total - it)
            print(f'  epoch {runner.epoch + 1:2d}/{runner.max_epochs}  iter {it:4d}/{total}  '
                  f'loss {loss:.3f}  lr {lr:.1e}  elapsed {_fmt(elapsed)}  '
                  f'eta {_fmt(eta)}', flush=True)

    return DemoProgressHook()


def train_and_evaluate(args):
    """Steps 2 and 3: returns (checkpoint path, COCO metrics, timings)."""
    from efficientvit_det.apis import build_runner
    cfg = build_config(args)
    epochs, batch = cfg.train_cfg.max_epochs, cfg.train_dataloader.batch_size
    n_iter = epochs * -(-args.num_train // batch)
    print(f'[2/4] training {osp.basename(args.config)} from scratch on CPU: {epochs} x '
          f'{args.num_train} images ({n_iter} iterations of batch {batch}) -> {args.work_dir}',
          flush=True)
    timings = {}
    with _timed(timings, 'train'), known_warnings_silenced(not args.verbose):
        # quiet: mmengine's console shows warnings only; its log file keeps everything
        runner = build_runner(cfg, quiet=not args.verbose)
        runner.register_hook(make_progress_hook(args.log_interval))
        runner.train()
    print(f'[3/4] COCO evaluation on {args.num_val} validation images'
          + ('' if args.verbose else " (pycocotools' full table: --verbose)"), flush=True)
    with _timed(timings, 'test'), _quiet_stdout(not args.verbose):
        metrics = runner.test()
    return osp.join(args.work_dir, f'epoch_{epochs}.pth'), metrics, timings


def detect_on_validation_images(args, ckpt: str):
    """Step 4: DetInferencer on the first ``num_vis`` validation images."""
    from efficientvit_det.apis import detect_images
    val_dir = osp.join(args.data_root, 'val')
    images = sorted(osp.join(val_dir, f) for f in os.listdir(val_dir)
                    if f.endswith('.jpg'))[:args.num_vis]
    infer_dir = osp.join(args.work_dir, 'infer')
    print(f'[4/4] detection on {len(images)} validation images -> {infer_dir}', flush=True)
    return detect_images(args.config, ckpt, images, out_dir=infer_dir, device=args.device,
                         score_thr=args.score_thr, cfg_options=args.cfg_options,
                         show_progress=False, verbose=args.verbose)


def _box_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(dets: list, gts: list, iou_thr: float = 0.5) -> list:
    """Greedy matching by score (same class, IoU >= ``iou_thr``): per ground-truth box, the
    index of its detection or None.  ``dets``: (x1, y1, x2, y2, label, score)."""
    found = [None] * len(gts)
    for d_idx in sorted(range(len(dets)), key=lambda i: -dets[i][5]):
        d = dets[d_idx]
        best, best_iou = None, iou_thr
        for g_idx, g in enumerate(gts):
            if found[g_idx] is None and g[4] == d[4] and _box_iou(d, g) >= best_iou:
                best, best_iou = g_idx, _box_iou(d, g)
        if best is not None:
            found[best] = d_idx
    return found


def _ground_truth(ann_file: str) -> dict:
    """file name -> [(x1, y1, x2, y2, label)] of the objects that count (not iscrowd)."""
    with open(ann_file) as f:
        coco = json.load(f)
    names = {im['id']: im['file_name'] for im in coco['images']}
    gts = {name: [] for name in names.values()}
    for a in coco['annotations']:
        if not a.get('iscrowd'):
            x, y, w, h = a['bbox']
            gts[names[a['image_id']]].append((x, y, x + w, y + h, a['category_id'] - 1))
    return gts


def draw_grid(entries: list, ann_file: str, palette, out_file: str) -> dict:
    """One picture of the detections on the demo's validation images: coloured boxes with
    class and score, white boxes for the objects missed, "found k/n, m wrong" under each
    image.  Returns the counts: objects found, objects annotated, wrong detections."""
    from PIL import Image, ImageDraw, ImageFont
    gts = _ground_truth(ann_file)
    font = ImageFont.load_default()
    tiles, n_found, n_total, n_wrong = [], 0, 0, 0
    for e in entries:
        with Image.open(e['image']) as im:
            im = im.convert('RGB').resize((e['width'] * GRID_ZOOM, e['height'] * GRID_ZOOM),
                                          Image.BICUBIC)
        tile = Image.new('RGB', (im.width, im.height + 14), (255, 255, 255))
        tile.paste(im)
        draw = ImageDraw.Draw(tile)
        dets = [(*d['bbox'], d['label'], d['score']) for d in e['detections']]
        truth = gts.get(osp.basename(e['image']), [])
        found = match_detections(dets, truth)
        for g, hit in zip(truth, found):
            if hit is None:
                draw.rectangle([v * GRID_ZOOM for v in g[:4]], outline=(255, 255, 255), width=1)
        for d in e['detections']:
            _draw_detection(draw, d, tuple(palette[d['label'] % len(palette)]), font, im.width)
        hits = sum(h is not None for h in found)
        wrong = len(dets) - hits
        draw.text((4, im.height + 1), f'found {hits}/{len(truth)}' +
                  (f', {wrong} wrong' if wrong else ''), fill=(0, 0, 0), font=font)
        n_found, n_total, n_wrong = n_found + hits, n_total + len(truth), n_wrong + wrong
        tiles.append(tile)
    _save_grid(tiles, out_file)
    return dict(found=n_found, objects=n_total, wrong=n_wrong)


def _draw_detection(draw, det: dict, colour: tuple, font, width: int) -> None:
    from efficientvit_det.engine.visualization import format_score
    x1, y1, x2, y2 = (v * GRID_ZOOM for v in det['bbox'])
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
    text = f'{det["class"]} {format_score(det["score"])}'
    text_width = draw.textlength(text, font=font)
    tx, ty = max(min(x1, width - text_width - 1), 1), max(y1 - 11, 0)  # inside the picture
    left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
    draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
    draw.text((tx, ty), text, fill=(255, 255, 255), font=font)


def _save_grid(tiles: list, out_file: str) -> None:
    from PIL import Image
    if not tiles:
        return
    w, h = tiles[0].size
    rows = -(-len(tiles) // GRID_COLUMNS)
    sheet = Image.new('RGB', (w * min(len(tiles), GRID_COLUMNS), h * rows), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % GRID_COLUMNS) * w, (i // GRID_COLUMNS) * h))
    sheet.save(out_file, quality=85, optimize=True)


def summarize(args, ckpt: str, metrics: dict, entries: list, grid: dict,
              timings: dict) -> dict:
    def m(key):
        return float(metrics.get(f'coco/bbox_{key}', float('nan')))

    infer_dir = osp.join(args.work_dir, 'infer')
    per_class = {k[len('coco/'):-len('_precision')]: float(v) for k, v in metrics.items()
                 if k.endswith('_precision')}
    summary = dict(
        config=args.config, checkpoint=ckpt, data_root=args.data_root,
        bbox_mAP=m('mAP'), bbox_mAP_50=m('mAP_50'), bbox_mAP_75=m('mAP_75'),
        bbox_mAP_s=m('mAP_s'), bbox_mAP_m=m('mAP_m'), bbox_mAP_l=m('mAP_l'),
        per_class_AP=per_class,
        visualisations=osp.join(infer_dir, 'vis'),
        detections_grid=osp.join(args.work_dir, 'detections_grid.jpg'),
        detections_json=osp.join(infer_dir, 'detections.json'),
        num_detections=sum(len(e['detections']) for e in entries),
        grid_found=grid['found'], grid_objects=grid['objects'], grid_wrong=grid['wrong'],
        seconds={k: round(v, 1) for k, v in timings.items()})
    with open(osp.join(args.work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def print_summary(s: dict, args) -> None:
    bar = '=' * 72
    print(bar)
    print('efficientvit_det demo: RetinaNet + EfficientViT on synthetic shapes (CPU)')
    print(f'  COCO bbox mAP {s["bbox_mAP"]:.3f}   AP50 {s["bbox_mAP_50"]:.3f}   '
          f'AP75 {s["bbox_mAP_75"]:.3f}')
    print('  AP small / medium / large (COCO area ranges): ' + ' / '.join(
        f'{v:.3f}' if v >= 0 else 'n/a' for v in (s['bbox_mAP_s'], s['bbox_mAP_m'],
                                                   s['bbox_mAP_l'])))
    if s['per_class_AP']:
        print('  per class: ' + ', '.join(f'{k} {v:.3f}' for k, v in s['per_class_AP'].items()))
    print(f'  what it means: COCO-protocol box mAP@[.5:.95] on {args.num_val} generated '
          'validation images of a\n    synthetic 6-class task, after training from scratch '
          f'for {_fmt(s["seconds"]["train"])} on this CPU (not COCO numbers)')
    print(f'  picture:         {s["detections_grid"]}\n                   {s["grid_found"]} '
          f'of {s["grid_objects"]} objects found (right class, IoU >= 0.5), '
          f'wrong boxes: {s["grid_wrong"]} (score >= {args.score_thr})')
    print(f'  drawn images:    {s["visualisations"]}/')
    print(f'  detections JSON: {s["detections_json"]} ({s["num_detections"]} boxes with '
          f'score >= {args.score_thr})')
    print(f'  checkpoint:      {s["checkpoint"]}')
    print(f'  summary JSON:    {osp.join(args.work_dir, "summary.json")}')
    print('  time: ' + ', '.join(f'{k} {_fmt(v)}' for k, v in s['seconds'].items()))
    print(bar)


def main(argv=None) -> dict:
    from efficientvit_det.datasets.synthetic import PALETTE
    args = parse_args(argv)
    if not args.verbose:
        quiet_console()
    t_start, timings = time.time(), {}
    warn_if_cpu_is_shared()
    with _timed(timings, 'dataset'):
        prepare_dataset(args)
    ckpt, metrics, train_timings = train_and_evaluate(args)
    timings.update(train_timings)
    with _timed(timings, 'infer'):
        entries = detect_on_validation_images(args, ckpt)
        grid = draw_grid(entries, osp.join(args.data_root, 'annotations', 'instances_val.json'),
                         PALETTE, osp.join(args.work_dir, 'detections_grid.jpg'))
    timings['total'] = time.time() - t_start
    summary = summarize(args, ckpt, metrics, entries, grid, timings)
    print_summary(summary, args)
    return summary


if __name__ == '__main__':
    sys.exit(run_tool(main))
