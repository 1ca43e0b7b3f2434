"""Train a detector (mmdet 3.x / mmengine Runner) with efficientvit_det's modules registered.

Examples::

    python tools/train.py configs/retinanet_efficientvit_m4_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/run1 --resume          # auto-resume
    python tools/train.py CONFIG --resume work_dirs/run1/epoch_3.pth          # given file
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    python tools/train.py CONFIG --amp                                        # mixed precision
    bash tools/dist_train.sh CONFIG 8                                          # DDP

Without CUDA, distributed runs use the gloo backend and CPU DDP automatically.
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction

from efficientvit_det.apis import build_runner, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume training: with no value, from the last checkpoint in the work dir '
        '(if there is one); with a path, from that checkpoint')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr linearly with the total batch size '
                        '(relative to auto_scale_lr.base_batch_size)')
    parser.add_argument('--seed', type=int, default=None, help='random seed')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms (with --seed)')
    parser.add_argument('--no-validate', action='store_true',
                        help='skip the validation during training')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, xxx=yyy format (e.g. '
        'train_dataloader.batch_size=4 model.bbox_head.num_classes=3)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local_rank / --local-rank; torchrun uses LOCAL_RANK
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.resume not in (None, 'auto') and not osp.isfile(args.resume):
        parser.error(f'--resume: no checkpoint at {args.resume}')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def training_config(args: argparse.Namespace) -> Config:
    """The config with every command-line option applied."""
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise SystemExit('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume is not None:
        cfg.resume = True
        # 'auto': mmengine finds work_dir/last_checkpoint
        cfg.load_from = None if args.resume == 'auto' else args.resume
    if args.seed is not None:
        cfg.randomness = dict(seed=args.seed, deterministic=args.deterministic)
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return cfg


def main(argv=None) -> None:
    build_runner(training_config(parse_args(argv))).train()


if __name__ == '__main__':
    main()
