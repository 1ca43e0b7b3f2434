"""Train a detector (mmdet 3.x / mmengine Runner) with efficientvit_det's modules registered.

Examples::

    python tools/train.py configs/retinanet_efficientvit_m4_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/run1 --resume          # auto-resume
    python tools/train.py CONFIG --resume work_dirs/run1/epoch_3.pth          # given file
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    python tools/train.py CONFIG --amp                                        # mixed precision
    python tools/train.py CONFIG --cfg-options load_from=CKPT --no-strict     # fine-tune
    bash tools/dist_train.sh CONFIG 8                                          # DDP

Without CUDA, distributed runs use the gloo backend and CPU DDP automatically.

Before the Runner is built, the inputs are checked and a mistake ends the tool with one line
``error: ...`` and exit status 2 (efficientvit_det.cli): the annotation files and image
folders, the backbone's ImageNet checkpoint (``model.backbone.init_cfg``), and a ``load_from``
/ ``--resume`` checkpoint: it must exist, be a weights-only pickle and fit the config (arch,
number of classes, keys; ``--no-strict`` loads only the tensors that fit, for fine-tuning on
other classes). ``--resume`` with nothing to resume says so and starts from the beginning; a
finished run says it is finished. The console shows progress lines; mmengine's full log
(environment, config, hooks) is in ``WORK_DIR/<timestamp>/<timestamp>.log`` (``--verbose``
prints it too).
"""
import argparse
import contextlib
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction

from efficientvit_det.apis import (
    build_runner,
    check_checkpoint,
    check_data_files,
    check_pretrained_backbone,
    finished_training,
    load_config,
    resume_checkpoint,
    use_robust_test_loading,
)
from efficientvit_det.cli import fail, known_warnings_silenced, quiet_console, run_tool, wrote


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
    parser.add_argument('--no-strict', action='store_true',
                        help='load_from / --resume: load only the tensors of the checkpoint '
                        'that fit the config (fine-tuning on other classes) instead of '
                        'stopping at the first difference')
    parser.add_argument('--verbose', action='store_true',
                        help="mmengine's full log on the console (environment, config, hooks, "
                        'third-party warnings); it is always in the log file')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, xxx=yyy format (e.g. '
        'train_dataloader.batch_size=4 model.bbox_head.num_classes=3)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local_rank / --local-rank; torchrun uses LOCAL_RANK
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def training_config(args: argparse.Namespace) -> Config:
    """The config with every command-line option applied."""
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:  # CUDA: float16 + loss scale; CPU: bfloat16 (efficientvit_det/engine/amp.py)
        from efficientvit_det.engine.amp import configure_amp
        print(configure_amp(cfg))
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            fail('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume is not None:
        cfg.resume = True
        # 'auto': work_dir/last_checkpoint (check_inputs resolves it, or turns resume off)
        cfg.load_from = None if args.resume == 'auto' else args.resume
    if args.seed is not None:
        cfg.randomness = dict(seed=args.seed, deterministic=args.deterministic)
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    return cfg


def check_inputs(cfg: Config, args: argparse.Namespace) -> bool:
    """Everything the user gave, checked before the Runner is built (one line on a mistake).
    Resolves ``--resume``; returns False when the run is already finished."""
    check_data_files(cfg, ('train',) if args.no_validate else ('train', 'val'))
    check_pretrained_backbone(cfg)
    strict = not args.no_strict
    if args.resume is not None:
        path = resume_checkpoint(cfg, args.resume)
        if path is None:
            print(f'--resume: nothing to resume in {cfg.work_dir} (no last_checkpoint): '
                  'training from the start', flush=True)
            cfg.resume = False
            return True
        ckpt = check_checkpoint(cfg, path, strict=strict, what='--resume checkpoint')
        done = finished_training(cfg, ckpt)
        if done:
            print(f'nothing to resume: {path} is the end of the schedule ({done}); raise '
                  'train_cfg.max_epochs (or max_iters) to train longer', flush=True)
            return False
        cfg.load_from = path
        print(f'resuming from {path}', flush=True)
    elif cfg.get('load_from'):
        check_checkpoint(cfg, cfg.load_from, strict=strict, what='load_from checkpoint')
    return True


def main(argv=None) -> int:
    from efficientvit_det.engine.progress import TrainProgressHook

    args = parse_args(argv)
    if not args.verbose:
        quiet_console()
    cfg = training_config(args)
    if not check_inputs(cfg, args):
        return 0
    use_robust_test_loading(cfg, ('val',))  # a broken validation image: one line naming it
    with known_warnings_silenced(not args.verbose), contextlib.ExitStack() as stack:
        runner = build_runner(cfg, quiet=not args.verbose)
        log_file = osp.join(runner.log_dir, f'{runner.timestamp}.log')
        if not args.verbose:
            interval = (cfg.get('default_hooks') or {}).get('logger', {}).get('interval', 50)
            runner.register_hook(TrainProgressHook(interval))
            print(f'training {osp.basename(args.config)} -> {runner.work_dir} '
                  f'(full log: {log_file})', flush=True)
            # pycocotools prints its progress on stdout (the progress hook writes past this)
            stack.enter_context(contextlib.redirect_stdout(
                stack.enter_context(open(os.devnull, 'w'))))
        runner.train()
    last = osp.join(runner.work_dir, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            wrote('checkpoint', f.read().strip())
    wrote('log', log_file)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
