"""Evaluate a trained detector: COCO AP (bbox, and segm for Mask R-CNN) via mmdet's CocoMetric.

Examples::

    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --out results.pkl --show-dir vis/
    python tools/test.py CONFIG CHECKPOINT --tta          # flip + scales test-time augmentation
    bash tools/dist_test.sh CONFIG CHECKPOINT 8

The model is evaluated in deploy mode (BatchNorms folded; ``--no-fuse`` to opt out) and, with
``--precision auto`` (the default), in bf16 autocast + channels_last on a CPU that runs bf16
natively (AMX-BF16 or AVX512-BF16), fp32 elsewhere and on CUDA (``InferenceOptimizationHook``,
docs/precision.md).

``--out`` writes the raw predictions (mmdet's DumpDetResults format: one dict per image
with ``pred_instances`` bboxes / scores / labels); ``--show-dir`` writes each image with its
ground truth (left) and predictions (right); the tool ends with the paths it wrote.

Before the Runner is built, the checkpoint (exists, weights-only pickle, fits the config:
arch, number of classes, keys; ``--no-strict`` loads what fits) and the test data files are
checked; a mistake ends the tool with one line ``error: ...`` and exit status 2, an image
that cannot be decoded too (evaluation needs every image). The console shows a progress line
(count, rate, ETA) and the metrics; mmengine's full log and pycocotools' tables are in the
log file (``--verbose`` prints them too).
"""
import argparse
import contextlib
import os
import os.path as osp
import sys

from mmengine.config import Config, ConfigDict, DictAction

from efficientvit_det.apis import build_runner, check_checkpoint, check_data_files, load_config, use_robust_test_loading
from efficientvit_det.cli import fail, known_warnings_silenced, quiet_console, run_tool, wrote
from efficientvit_det.inference import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation log/metrics go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--out', type=str, help='dump the predictions to a pickle file')
    parser.add_argument('--show', action='store_true', help='show results in a window')
    parser.add_argument('--show-dir', help='save images with predictions to this folder')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='score threshold of the boxes drawn with --show/--show-dir')
    parser.add_argument('--wait-time', type=float, default=2, help='--show interval (s)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_model and tta_pipeline")
    parser.add_argument('--precision', choices=PRECISIONS, default='auto',
                        help='auto: bf16 on CPUs with native bf16 (AMX/AVX512-BF16), else fp32 '
                             '(default: %(default)s)')
    parser.add_argument('--no-fuse', action='store_true',
                        help='do not put the model in deploy mode (BatchNorm folding)')
    parser.add_argument('--no-strict', action='store_true',
                        help='load only the tensors of the checkpoint that fit the config '
                        'instead of stopping at the first difference')
    parser.add_argument('--verbose', action='store_true',
                        help="mmengine's full log and pycocotools' output on the console")
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error('--out must be a .pkl or .pickle file')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _draw_predictions(cfg: Config, args: argparse.Namespace) -> None:
    vis = cfg.default_hooks.get('visualization')
    if vis is None:
        fail('--show/--show-dir need default_hooks.visualization (DetVisualizationHook) in '
             'the config')
    vis.update(draw=True, score_thr=args.score_thr)
    if args.show:
        vis.update(show=True, wait_time=args.wait_time)
    if args.show_dir:
        # DetVisualizationHook joins a relative test_out_dir onto work_dir/timestamp
        os.makedirs(args.show_dir, exist_ok=True)
        vis['test_out_dir'] = osp.abspath(args.show_dir)


def _use_tta(cfg: Config) -> None:
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        fail('--tta needs tta_model and tta_pipeline in the config')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def _dump_predictions(cfg: Config, out: str) -> None:
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    dump = ConfigDict(type='DumpDetResults', out_file_path=osp.abspath(out))
    evaluator = cfg.test_evaluator
    cfg.test_evaluator = [*evaluator, dump] if isinstance(evaluator, (list, tuple)) \
        else [evaluator, dump]


def _optimize_inference(cfg: Config, args: argparse.Namespace) -> None:
    """Deploy mode and precision through InferenceOptimizationHook (replacing one the config
    may already have, so the command line decides)."""
    hooks = [h for h in cfg.get('custom_hooks', None) or []
             if str(h.get('type', '')).split('.')[-1] != 'InferenceOptimizationHook']
    hooks.append(ConfigDict(type='InferenceOptimizationHook', precision=args.precision,
                            deploy=not args.no_fuse))
    cfg.custom_hooks = hooks


def evaluation_config(args: argparse.Namespace) -> Config:
    """The config with every command-line option applied."""
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from, cfg.resume = args.checkpoint, False
    if args.show or args.show_dir:
        _draw_predictions(cfg, args)
    if args.tta:
        _use_tta(cfg)
    if args.out is not None:
        _dump_predictions(cfg, args.out)
    _optimize_inference(cfg, args)
    return cfg


def main(argv=None) -> dict:
    from efficientvit_det.engine.progress import EvalProgressHook, format_metrics

    args = parse_args(argv)
    if not args.verbose:
        quiet_console()
    cfg = load_config(args.config, args.cfg_options)
    check_checkpoint(cfg, args.checkpoint, strict=not args.no_strict)
    check_data_files(cfg, ('test',))
    cfg = evaluation_config(args)
    use_robust_test_loading(cfg, ('test',))
    with known_warnings_silenced(not args.verbose):
        runner = build_runner(cfg, quiet=not args.verbose)
        log_file = osp.join(runner.log_dir, f'{runner.timestamp}.log')
        with contextlib.ExitStack() as stack:
            if not args.verbose:
                runner.register_hook(EvalProgressHook('test (TTA)' if args.tta else 'test'))
                print(f'evaluating {args.checkpoint}'
                      f'{" with test-time augmentation" if args.tta else ""} '
                      f'(full log: {log_file})', flush=True)
                # pycocotools prints its progress on stdout; mmdet logs its tables (log file)
                stack.enter_context(contextlib.redirect_stdout(
                    stack.enter_context(open(os.devnull, 'w'))))
            metrics = runner.test()
    print(format_metrics(metrics), flush=True)
    if args.out is not None:
        wrote('predictions', args.out)
    if args.show_dir:
        wrote('drawn images', args.show_dir)
    wrote('log', log_file)
    return metrics


if __name__ == '__main__':
    sys.exit(run_tool(main))
