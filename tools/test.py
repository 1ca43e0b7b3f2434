"""Evaluate a trained detector: COCO bbox AP / AP50 / AP75 (pycocotools via CocoMetric).

Examples::

    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --out results.pkl --show-dir vis/
    bash tools/dist_test.sh CONFIG CHECKPOINT 8

``--out`` writes the raw predictions (mmdet's DumpDetResults format: one dict per image
with ``pred_instances`` bboxes / scores / labels); ``--show-dir`` writes each image with its
ground truth (left) and predictions (right).
"""
import argparse
import os
import os.path as osp
import sys

_TOOLS = osp.dirname(osp.abspath(__file__))
_ROOT = osp.dirname(_TOOLS)
for _p in (_ROOT, _TOOLS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mmengine.config import ConfigDict, DictAction  # noqa: E402

from train import load_config, setup_device_for_dist  # noqa: E402  (tools/train.py)


def parse_args(argv=None):
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
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False

    if args.show or args.show_dir:
        hooks = cfg.default_hooks
        if 'visualization' not in hooks:
            raise RuntimeError('--show/--show-dir need default_hooks.visualization '
                               '(DetVisualizationHook) in the config')
        vis = hooks['visualization']
        vis['draw'] = True
        vis['score_thr'] = args.score_thr
        if args.show:
            vis['show'] = True
            vis['wait_time'] = args.wait_time
        if args.show_dir:
            # DetVisualizationHook joins a relative test_out_dir onto work_dir/timestamp;
            # an absolute path is used as given.
            os.makedirs(args.show_dir, exist_ok=True)
            vis['test_out_dir'] = osp.abspath(args.show_dir)

    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl or .pickle file')
        out_dir = osp.dirname(osp.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        dump = ConfigDict(type='DumpDetResults', out_file_path=osp.abspath(args.out))
        evaluator = cfg.test_evaluator
        if isinstance(evaluator, (list, tuple)):
            cfg.test_evaluator = list(evaluator) + [dump]
        else:
            cfg.test_evaluator = [evaluator, dump]

    setup_device_for_dist(cfg, args.launcher)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    metrics = runner.test()
    if args.out is not None:
        print(f'predictions written to {osp.abspath(args.out)}')
    return metrics


if __name__ == '__main__':
    main()
