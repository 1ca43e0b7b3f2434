"""Train a detector (mmdet 3.x / mmengine Runner) with efficientvit_det's modules registered.

Examples::

    python tools/train.py configs/retinanet_efficientvit_m4_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/run1 --resume          # auto-resume
    python tools/train.py CONFIG --resume work_dirs/run1/epoch_3.pth          # given file
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    bash tools/dist_train.sh CONFIG 8                                          # DDP

Without CUDA, distributed runs use the gloo backend and CPU DDP automatically.
"""
import argparse
import os
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, _ROOT)

from mmengine.config import Config, DictAction  # noqa: E402


def parse_args(argv=None):
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
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _cpu_dist_env(launcher):
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for ``launcher`` (as mmengine sets them)."""
    env = os.environ
    if launcher == 'slurm':
        import subprocess
        env['RANK'] = env['SLURM_PROCID']
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
        if 'MASTER_ADDR' not in env:
            node_list = env['SLURM_NODELIST']
            env['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
    elif launcher == 'mpi':
        env['RANK'] = env['OMPI_COMM_WORLD_RANK']
        env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        env['LOCAL_RANK'] = env.get('OMPI_COMM_WORLD_LOCAL_RANK', '0')
        env.setdefault('MASTER_ADDR', '127.0.0.1')
    env.setdefault('MASTER_PORT', '29500')


def setup_device_for_dist(cfg, launcher):
    """Use gloo + CPU DDP when CUDA is unavailable (otherwise leave the config alone).

    mmengine's defaults assume one GPU per process (nccl, ``torch.cuda.set_device`` in its
    launchers, DDP with ``device_ids=[LOCAL_RANK]``); none of that works without CUDA.
    """
    import torch
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    wrapper['device_ids'] = None  # CPU modules: DDP must not get device ids
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    # Create the process group here (the Runner reuses an existing one), skipping the
    # launchers' torch.cuda.set_device.
    import datetime

    import torch.distributed as dist
    if not dist.is_initialized():
        _cpu_dist_env(launcher)
        kwargs = {}
        if 'timeout' in dist_cfg:
            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        dist.init_process_group(backend='gloo', **kwargs)


def load_config(args):
    """The config with ``--cfg-options``, the launcher and the work dir applied (train and test:
    ``args`` needs ``config``, ``launcher``, ``cfg_options`` and ``work_dir``)."""
    # importing the package registers our modules and the checkpoint compatibility layer
    # (configs also name it in custom_imports)
    import efficientvit_det  # noqa: F401

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_cfg(args):
    cfg = load_config(args)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and 'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size in '
                               'the config')

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None  # mmengine then finds work_dir/last_checkpoint
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    if args.seed is not None:
        cfg.randomness = dict(seed=args.seed, deterministic=args.deterministic)

    if args.no_validate:
        cfg.val_cfg = None
        cfg.val_dataloader = None
        cfg.val_evaluator = None

    setup_device_for_dist(cfg, args.launcher)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args)

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
