"""The built-in demo: synthetic dataset -> train RetinaNet-EfficientViT on CPU -> COCO mAP
-> inference on some validation images -> summary.  About 10 minutes on 2 CPU cores.

    python tools/demo.py                       # everything with the defaults
    python tools/demo.py --epochs 2            # shorter (lower mAP)
    python tools/demo.py --verbose             # mmengine's full log on the console

1. generates ``data/synthetic`` (800 train / 200 val images, 256 px, seed 0) unless an
   identical copy is already there;
2. trains ``configs/retinanet_efficientvit_m4_demo.py`` (from scratch, CPU) into
   ``work_dirs/demo``, printing progress;
3. evaluates COCO bbox mAP on the validation split;
4. runs ``tools/infer.py``'s DetInferencer path on a few validation images, writing
   ``work_dirs/demo/infer/vis/*.jpg`` and ``work_dirs/demo/infer/detections.json``;
5. prints a summary (mAP, timings, where the files are) and writes it to
   ``work_dirs/demo/summary.json``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

_TOOLS = osp.dirname(osp.abspath(__file__))
_ROOT = osp.dirname(_TOOLS)
for _p in (_ROOT, _TOOLS):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def parse_args(argv=None):
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(description='efficientvit_det demo on the synthetic dataset')
    p.add_argument('--config', default=osp.join(_ROOT, 'configs',
                                                'retinanet_efficientvit_m4_demo.py'))
    p.add_argument('--data-root', default='data/synthetic')
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--num-train', type=int, default=800)
    p.add_argument('--num-val', type=int, default=200)
    p.add_argument('--size', type=int, default=256, help='image side of the dataset')
    p.add_argument('--seed', type=int, default=0, help='dataset and training seed')
    p.add_argument('--difficulty', default='normal', choices=['normal', 'easy'],
                   help='dataset preset (easy: few large unoccluded objects, no clutter)')
    p.add_argument('--epochs', type=int, default=None,
                   help='override the number of epochs of the config')
    p.add_argument('--num-vis', type=int, default=8,
                   help='validation images to run the inferencer on')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='score threshold of the drawn / exported detections')
    p.add_argument('--device', default='cpu', help='inference device: cpu, cuda or auto')
    p.add_argument('--log-interval', type=int, default=20)
    p.add_argument('--verbose', action='store_true', help="show mmengine's full log")
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config entries, xxx=yyy format')
    return p.parse_args(argv)


def _fmt(seconds):
    seconds = int(round(seconds))
    return f'{seconds // 60}:{seconds % 60:02d}'


def _set_resize_scale(pipeline, size):
    for t in pipeline:
        if t.get('type') == 'Resize':
            t['scale'] = (size, size)


def build_config(args):
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
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
        cfg.train_cfg.max_epochs = args.epochs
        for sched in cfg.param_scheduler:
            if sched.get('type') == 'MultiStepLR':
                sched['end'] = args.epochs
                sched['milestones'] = [max(args.epochs - 1, 1)]  # lr x0.1 for the last epoch
    cfg.work_dir = args.work_dir
    cfg.randomness = dict(seed=args.seed)
    cfg.default_hooks.logger.interval = args.log_interval
    if not args.verbose:
        cfg.log_level = 'WARNING'
    return cfg


def make_progress_hook(interval):
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
            done = it - self.start_iter
            eta = elapsed / max(done, 1) * (total - it)
            print(f'  epoch {runner.epoch + 1}/{runner.max_epochs}  iter {it:4d}/{total}  '
                  f'loss {loss:.3f}  lr {lr:.1e}  elapsed {_fmt(elapsed)}  '
                  f'eta {_fmt(eta)}', flush=True)

    return DemoProgressHook()


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    timings = {}

    import efficientvit_det  # noqa: F401
    from efficientvit_det.datasets import dataset_is_complete, generate_dataset

    # 1. data ------------------------------------------------------------------------
    print(f'[1/4] dataset: {args.data_root}', flush=True)
    t = time.time()
    if dataset_is_complete(args.data_root, args.num_train, args.num_val, args.size,
                           args.seed, args.difficulty):
        print('  already generated (same parameters): reusing it')
    else:
        generate_dataset(args.data_root, args.num_train, args.num_val, args.size, args.seed,
                         args.difficulty)
    timings['dataset'] = time.time() - t

    # 2. training ----------------------------------------------------------------------
    from mmengine.runner import Runner
    cfg = build_config(args)
    n_iter = cfg.train_cfg.max_epochs * -(-args.num_train // cfg.train_dataloader.batch_size)
    print(f'[2/4] training {osp.basename(args.config)} on CPU for '
          f'{cfg.train_cfg.max_epochs} epochs (~{n_iter} iterations, batch '
          f'{cfg.train_dataloader.batch_size}); checkpoints -> {args.work_dir}', flush=True)
    t = time.time()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(make_progress_hook(args.log_interval))
    runner.train()
    timings['train'] = time.time() - t
    ckpt = osp.join(args.work_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')

    # 3. evaluation --------------------------------------------------------------------
    print(f'[3/4] COCO evaluation on {args.num_val} validation images', flush=True)
    t = time.time()
    metrics = runner.test()
    timings['test'] = time.time() - t
    del runner

    # 4. inference ---------------------------------------------------------------------
    import infer  # tools/infer.py
    val_dir = osp.join(args.data_root, 'val')
    images = sorted(osp.join(val_dir, f) for f in os.listdir(val_dir)
                    if f.endswith('.jpg'))[:args.num_vis]
    infer_dir = osp.join(args.work_dir, 'infer')
    print(f'[4/4] inference on {len(images)} validation images -> {infer_dir}', flush=True)
    t = time.time()
    entries = infer.run(args.config, ckpt, images, out_dir=infer_dir, device=args.device,
                        score_thr=args.score_thr, cfg_options=args.cfg_options,
                        show_progress=False)
    timings['infer'] = time.time() - t
    timings['total'] = time.time() - t_start

    # summary ----------------------------------------------------------------------------
    def m(key):
        return float(metrics.get(f'coco/bbox_{key}', float('nan')))

    per_class = {k[len('coco/'):-len('_precision')]: float(v) for k, v in metrics.items()
                 if k.endswith('_precision')}
    summary = dict(
        config=args.config, checkpoint=ckpt, data_root=args.data_root,
        bbox_mAP=m('mAP'), bbox_mAP_50=m('mAP_50'), bbox_mAP_75=m('mAP_75'),
        bbox_mAP_s=m('mAP_s'), bbox_mAP_m=m('mAP_m'), bbox_mAP_l=m('mAP_l'),
        per_class_AP=per_class,
        visualisations=osp.join(infer_dir, 'vis'),
        detections_json=osp.join(infer_dir, 'detections.json'),
        num_detections=sum(len(e['detections']) for e in entries),
        seconds={k: round(v, 1) for k, v in timings.items()})
    with open(osp.join(args.work_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    bar = '=' * 64
    print(bar)
    print('efficientvit_det demo: RetinaNet + EfficientViT on synthetic shapes (CPU)')
    print(f'  COCO bbox mAP {summary["bbox_mAP"]:.3f}   AP50 {summary["bbox_mAP_50"]:.3f}   '
          f'AP75 {summary["bbox_mAP_75"]:.3f}')
    print(f'  AP small / medium / large: {summary["bbox_mAP_s"]:.3f} / '
          f'{summary["bbox_mAP_m"]:.3f} / {summary["bbox_mAP_l"]:.3f}')
    if per_class:
        print('  per class: ' + ', '.join(f'{k} {v:.3f}' for k, v in per_class.items()))
    print(f'  checkpoint:      {ckpt}')
    print(f'  visualisations:  {summary["visualisations"]} ({len(entries)} images, '
          f'{summary["num_detections"]} boxes with score >= {args.score_thr})')
    print(f'  detections JSON: {summary["detections_json"]}')
    print(f'  summary JSON:    {osp.join(args.work_dir, "summary.json")}')
    print('  time: ' + ', '.join(f'{k} {_fmt(v)}' for k, v in timings.items()))
    print(bar)
    return summary


if __name__ == '__main__':
    main()
