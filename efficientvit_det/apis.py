"""What the command-line tools are thin over: configs, detectors, runners, inference.

* :func:`load_config`: a config file (or ``Config``) with ``--cfg-options`` applied;
* :func:`init_detector`: a detector built from a config, its weights loaded through the one
  safe loader (:func:`efficientvit_det.checkpoint.detector.load_detector_checkpoint`: weights-only
  pickles, strict key matching by default), class names from the checkpoint's meta,
  optionally in deploy mode (:func:`efficientvit_det.deploy.deploy_model`);
* :func:`build_runner` / :func:`setup_cpu_distributed`: an mmengine Runner, with gloo + CPU DDP
  when CUDA is missing;
* :func:`prepare_inference` (from :mod:`efficientvit_det.inference`): deploy mode and the
  inference precision (``auto`` | ``fp32`` | ``bf16``) applied to a built detector;
* :func:`resolve_device`, :func:`collect_images`, :func:`check_images`, :func:`detect_images`:
  inference on files (a broken image is skipped and named, the rest runs);
* checks that run before anything heavy, so a user's mistake ends a tool in one line
  (:mod:`efficientvit_det.cli`): :func:`check_checkpoint` (the file exists, is a safe pickle
  and fits the config: arch, classes, key groups), :func:`check_data_files` (annotation files
  and image folders of the config's dataloaders), :func:`check_pretrained_backbone` (the
  backbone's ImageNet checkpoint of ``init_cfg``), :func:`resume_checkpoint` (what ``--resume``
  would continue from, or that there is nothing to resume / the run is finished).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import logging
import os
import os.path as osp
import subprocess
import sys
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from torch import nn

from efficientvit_det.checkpoint import load_checkpoint_file
from efficientvit_det.checkpoint.detector import (
    NOT_STRICT_HINT,
    CheckpointMismatchError,
    checkpoint_mismatch,
    load_detector_checkpoint,
)
from efficientvit_det.cli import Progress, UserInputError, known_warnings_silenced, quiet_console
from efficientvit_det.datasets.image_files import IMG_EXTENSIONS, images_in_folder
from efficientvit_det.deploy import deploy_model, detections_entry
from efficientvit_det.inference import PRECISIONS, prepare_inference

__all__ = ['load_config', 'init_detector', 'build_detector', 'load_detector_checkpoint',
           'build_runner', 'setup_cpu_distributed', 'resolve_device', 'collect_images',
           'check_images', 'readable_images', 'ImageCheck', 'detect_images',
           'prepare_inference', 'check_checkpoint', 'check_data_files',
           'check_pretrained_backbone', 'resume_checkpoint', 'finished_training',
           'use_robust_test_loading', 'DeviceUnavailableError', 'IMG_EXTENSIONS']

ConfigLike = Union[str, os.PathLike, Config]


def load_config(config: ConfigLike, cfg_options: Optional[Mapping[str, Any]] = None) -> Config:
    """``config`` (a file or a ``Config``, copied) with ``cfg_options`` merged in.

    ``cfg_options`` is what mmengine's ``DictAction`` makes of ``--cfg-options a.b=1 c=[2,3]``.
    Importing this module registers efficientvit_det's modules, so configs need no
    ``custom_imports`` to find them.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config}')
        try:
            cfg = Config.fromfile(str(config))
        except (SyntaxError, FileNotFoundError) as exc:  # a broken file or a missing _base_
            raise UserInputError(f'cannot read config {config}: {exc}') from None
    else:
        raise TypeError(f'config must be a file path or a Config, got {type(config).__name__}')
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    return cfg


def init_detector(config: ConfigLike, checkpoint: Optional[str] = None, device: str = 'cpu',
                  cfg_options: Optional[Mapping[str, Any]] = None, *, strict: bool = True,
                  deploy: bool = False) -> nn.Module:
    """A detector in eval mode on ``device``, with ``model.cfg`` set.

    Args:
        config: config file or ``Config``.
        checkpoint: detector checkpoint (see :func:`load_detector_checkpoint`); ``None`` keeps
            the initial random weights (smoke tests and latency only). The backbone's ImageNet
            ``init_cfg`` is never loaded here: a detector checkpoint holds every weight.
        strict: every key of the model must be in the checkpoint and vice versa.
        deploy: put the model in deploy mode (BatchNorms folded, conv+ReLU merged).
    """
    cfg = load_config(config, cfg_options)
    model = build_detector(cfg)
    if checkpoint is not None:
        load_detector_checkpoint(model, checkpoint, strict=strict)
    model.cfg = cfg
    model = model.to(resolve_device(device)).eval()
    return deploy_model(model) if deploy else model


def build_detector(cfg: Config) -> nn.Module:
    """The detector of ``cfg.model`` with its initial weights (the backbone's ``init_cfg`` is
    not loaded; a ``tta_model`` wrapper is not applied)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.get('backbone') is not None:
        model_cfg.backbone.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return MODELS.build(model_cfg)


# ---------------------------------------------------------------------------------------------
# checks before anything heavy: one line for what the user has to change
# ---------------------------------------------------------------------------------------------
def check_checkpoint(cfg: Config, checkpoint: str, *, strict: bool = True,
                     what: str = 'checkpoint') -> dict:
    """Read ``checkpoint`` once and check that it fits the model of ``cfg``; returns it.

    Raises ``FileNotFoundError`` (no such file), :class:`UnsafeCheckpointError` (a pickle that
    could run code) or, with ``strict``, :class:`CheckpointMismatchError` naming the difference
    in one line (backbone arch, number of classes, key groups). Without ``strict`` the
    difference is printed as a note (fine-tuning: only the tensors that fit are used).
    """
    if not osp.isfile(checkpoint) and '://' not in checkpoint:
        raise FileNotFoundError(f'{what} not found: {checkpoint}')
    ckpt = load_checkpoint_file(checkpoint)
    problem = checkpoint_mismatch(build_detector(cfg), ckpt, f'{what} {checkpoint}')
    if problem and strict:
        raise CheckpointMismatchError(f'{problem}; {NOT_STRICT_HINT}')
    if problem:
        print(f'note: {problem}; --no-strict: only the tensors that fit are loaded', flush=True)
    return ckpt


def _dataset_cfgs(dataset: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The datasets inside wrappers (RepeatDataset, ConcatDataset, ClassBalancedDataset...)."""
    if dataset.get('datasets') is not None:
        return [d for inner in dataset['datasets'] for d in _dataset_cfgs(inner)]
    if dataset.get('dataset') is not None:
        return _dataset_cfgs(dataset['dataset'])
    return [dataset]


def _data_path(root: Optional[str], path: str) -> str:
    return path if not root or osp.isabs(path) or '://' in path else osp.join(root, path)


def check_data_files(cfg: Config, splits: Sequence[str] = ('train', 'val', 'test')) -> None:
    """The annotation files and image folders of ``cfg``'s ``{split}_dataloader`` datasets
    (and the evaluators' ``ann_file``) exist; a ``FileNotFoundError`` naming the file, the
    config key and the ``--cfg-options`` that moves it otherwise. Remote paths are not
    checked. The annotation records themselves are checked when the dataset is built
    (``SafeCocoDataset``: one line naming the file and the record)."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not loader.get('dataset'):
            continue
        for ds in _dataset_cfgs(loader['dataset']):
            root = ds.get('data_root')
            hint = (f'set {split}_dataloader.dataset.data_root (now {root!r}) with '
                    f'--cfg-options {split}_dataloader.dataset.data_root=DIR')
            ann = ds.get('ann_file')
            if ann:
                path = _data_path(root, ann)
                if '://' not in path and not osp.isfile(path):
                    raise FileNotFoundError(f'{split} annotation file not found: {path} '
                                            f'({split}_dataloader.dataset.ann_file); {hint}')
            for key, prefix in (ds.get('data_prefix') or {}).items():
                path = _data_path(root, prefix) if prefix else None
                if path and '://' not in path and not osp.isdir(path):
                    raise FileNotFoundError(f'{split} image folder not found: {path} '
                                            f'({split}_dataloader.dataset.data_prefix.{key}); '
                                            f'{hint}')
        evaluator = cfg.get(f'{split}_evaluator')
        for ev in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]:
            ann = ev.get('ann_file') if isinstance(ev, Mapping) else None
            if ann and '://' not in ann and not osp.isfile(ann):
                raise FileNotFoundError(f'{split} evaluator annotation file not found: {ann} '
                                        f'({split}_evaluator.ann_file; --cfg-options '
                                        f'{split}_evaluator.ann_file=FILE)')


def check_pretrained_backbone(cfg: Config) -> Optional[str]:
    """The backbone's ``init_cfg=dict(type='Pretrained', checkpoint=...)`` exists, is a safe
    pickle and loads into the configured backbone (arch, layout); returns its path. Raises
    a one-line error otherwise, saying how to point at the file or train from scratch."""
    backbone = cfg.model.get('backbone') or {}
    init = backbone.get('init_cfg')
    if not isinstance(init, Mapping) or init.get('type') != 'Pretrained' \
            or not init.get('checkpoint'):
        return None
    path = str(init['checkpoint'])
    if '://' in path:
        return path
    if not osp.isfile(path):
        raise FileNotFoundError(
            f"backbone checkpoint not found: {path} (model.backbone.init_cfg.checkpoint, the "
            "ImageNet weights, MSRA or timm layout); pass --cfg-options "
            "model.backbone.init_cfg.checkpoint=PATH, or model.backbone.init_cfg=None to "
            "train the backbone from scratch")
    if backbone.get('type') in ('EfficientViT', 'efficientvit_det.EfficientViT'):
        from mmdet.registry import MODELS

        from efficientvit_det.checkpoint.backbone import load_pretrained
        silent = logging.getLogger('efficientvit_det.checks')  # the Runner logs the real load
        silent.propagate, silent.handlers = False, [logging.NullHandler()]
        model_cfg = copy.deepcopy(backbone)
        model_cfg.pop('init_cfg')
        load_pretrained(MODELS.build(model_cfg), path, logger=silent)
    else:
        load_checkpoint_file(path)
    return path


def resume_checkpoint(cfg: Config, resume: str) -> Optional[str]:
    """What ``--resume`` continues from: ``resume`` is a path or ``'auto'`` (the
    ``last_checkpoint`` of ``cfg.work_dir``). ``None`` when there is nothing to resume in the
    work dir. Raises when the named file is missing; the caller checks that it fits."""
    if resume != 'auto':
        if not osp.isfile(resume):
            raise FileNotFoundError(f'--resume: no checkpoint at {resume}')
        return resume
    pointer = osp.join(cfg.work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        last = f.read().strip()
    if not last:
        return None
    if not osp.isfile(last):
        raise FileNotFoundError(f'--resume: {pointer} names {last}, which does not exist; '
                                'pass --resume PATH with a checkpoint that does')
    return last


def finished_training(cfg: Config, checkpoint: Mapping[str, Any]) -> Optional[str]:
    """``'epoch 8 of 8'`` when ``checkpoint`` (loaded) is the end of ``cfg``'s schedule."""
    meta = checkpoint.get('meta') or {}
    train_cfg = cfg.get('train_cfg') or {}
    if train_cfg.get('max_epochs') and train_cfg.get('by_epoch', True) \
            and 'epoch' in meta and meta['epoch'] >= train_cfg['max_epochs']:
        return f'epoch {meta["epoch"]} of {train_cfg["max_epochs"]}'
    if train_cfg.get('max_iters') and 'iter' in meta and meta['iter'] >= train_cfg['max_iters']:
        return f'iteration {meta["iter"]} of {train_cfg["max_iters"]}'
    return None


def use_robust_test_loading(cfg: Config, splits: Sequence[str] = ('val', 'test')) -> None:
    """mmcv's plain ``LoadImageFromFile`` of the evaluation pipelines (and ``tta_pipeline``) ->
    ``RobustLoadImageFromFile(on_error='raise')`` with mmcv's semantics (EXIF tag applied, no
    size check): the same pixels, but an image that cannot be decoded stops the run with one
    line naming the file (``ImageLoadError``) instead of an assertion deep in a transform."""
    def swap(pipeline):
        for i, t in enumerate(pipeline or []):
            if isinstance(t, Mapping) and t.get('type') in ('LoadImageFromFile',
                                                            'mmdet.LoadImageFromFile') \
                    and set(t) <= {'type', 'backend_args', 'to_float32'}:
                pipeline[i] = dict(t, type='RobustLoadImageFromFile', on_error='raise',
                                   exif_orientation='apply', check_size=False)
            elif isinstance(t, Mapping) and t.get('type') == 'TestTimeAug':
                for group in t.get('transforms', []):
                    swap(group)

    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader and loader.get('dataset'):
            for ds in _dataset_cfgs(loader['dataset']):
                swap(ds.get('pipeline'))


# ---------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------
def _cpu_dist_env(launcher: str) -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for ``launcher``, as mmengine sets them."""
    env = os.environ
    if launcher == 'slurm':
        env['RANK'] = env['SLURM_PROCID']
        env['WORLD_SIZE'] = env['SLURM_NTASKS']
        env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {env["SLURM_NODELIST"]} | head -n1')
    elif launcher == 'mpi':
        env['RANK'] = env['OMPI_COMM_WORLD_RANK']
        env['WORLD_SIZE'] = env['OMPI_COMM_WORLD_SIZE']
        env['LOCAL_RANK'] = env.get('OMPI_COMM_WORLD_LOCAL_RANK', '0')
        env.setdefault('MASTER_ADDR', '127.0.0.1')
    env.setdefault('MASTER_PORT', '29500')


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Use gloo + CPU DDP when CUDA is unavailable (otherwise leave the config alone).

    mmengine's defaults assume one GPU per process (nccl, ``torch.cuda.set_device`` in its
    launchers, DDP with ``device_ids=[LOCAL_RANK]``); none of that works without CUDA. The
    process group is created here (the Runner reuses an existing one).
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    import torch.distributed as dist

    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    wrapper['device_ids'] = None  # CPU modules: DDP must not get device ids
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        _cpu_dist_env(launcher)
        kwargs = {}
        if 'timeout' in dist_cfg:
            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        dist.init_process_group(backend='gloo', **kwargs)


class _QuietConsole:
    """Runner mixin: the console shows warnings and errors only (no environment / config dump,
    no known third-party noise); the log file keeps everything."""

    def build_logger(self, *args, **kwargs):
        logger = super().build_logger(*args, **kwargs)
        quiet_console(logger)
        return logger


def build_runner(cfg: Config, *, quiet: bool = False):
    """An mmengine Runner for ``cfg`` (``runner_type`` honoured), distributed set-up done.

    ``quiet``: mmengine's console output is limited to warnings and errors (tools print their
    own progress lines; ``--verbose`` turns this off); the log file is unchanged.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    runner_cls = RUNNERS.get(cfg.runner_type) if 'runner_type' in cfg else Runner
    if quiet:
        runner_cls = type(f'Quiet{runner_cls.__name__}', (_QuietConsole, runner_cls), {})
    return runner_cls.from_cfg(cfg)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
class DeviceUnavailableError(UserInputError, ValueError):
    """``--device`` names a device this machine does not have (or no device at all)."""


def resolve_device(device: str = 'auto') -> str:
    """``auto`` -> ``cuda:0`` when available, else ``cpu``; a clear error for CUDA without one."""
    if device == 'auto':
        return 'cuda:0' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise DeviceUnavailableError(f'device {device!r}: CUDA is not available on this '
                                     'machine (use cpu or auto)')
    if device != 'cpu' and not device.startswith('cuda'):
        raise DeviceUnavailableError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files from files and folders (a folder: its images, sorted)."""
    files: List[str] = []
    for item in inputs:
        if osp.isdir(item):
            found = images_in_folder(item)
            if not found:
                raise FileNotFoundError(f'no images ({", ".join(IMG_EXTENSIONS)}) in {item}')
            files.extend(found)
        elif osp.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f'input not found: {item}')
    names = [osp.basename(f) for f in files]
    if len(set(names)) != len(names):
        print('warning: several inputs share a file name; their drawings overwrite each other',
              file=sys.stderr, flush=True)
    return files


class ImageCheck(NamedTuple):
    """:func:`check_images`' answer: the files that decode (with their upright size) and the
    ones that do not, each with the reason."""
    readable: List[str]
    sizes: Dict[str, Tuple[int, int]]  # (width, height) as the model sees the image
    skipped: List[Tuple[str, str]]


def check_images(files: Sequence[str]) -> ImageCheck:
    """Decode each file once (:func:`efficientvit_det.datasets.robust_loading.decode_image`:
    zero-byte, truncated, corrupt and non-image files fail with a reason) so that inference
    over a folder can skip a broken image and name it, as training does. Inference tools print
    ``skipped <file>: <reason>`` for each of ``skipped`` and go on with ``readable``."""
    from efficientvit_det.datasets.robust_loading import ImageLoadError, decode_image

    readable, sizes, skipped = [], {}, []
    for path in files:
        try:
            with open(path, 'rb') as f:
                buf = f.read()
            img, _ = decode_image(buf, path, exif_orientation='apply', check_size=False)
        except ImageLoadError as exc:
            skipped.append((path, exc.reason or str(exc)))
        except OSError as exc:
            skipped.append((path, f'cannot be read ({exc.strerror or exc})'))
        else:
            readable.append(path)
            sizes[path] = (int(img.shape[1]), int(img.shape[0]))
    return ImageCheck(readable, sizes, skipped)


def readable_images(inputs: Sequence[str], stream=None) -> ImageCheck:
    """:func:`collect_images` + :func:`check_images`, with a ``skipped <file>: <reason>`` line
    on ``stream`` (stderr) per broken file; :class:`UserInputError` when none is readable."""
    checked = check_images(collect_images(inputs))
    if not checked.readable:
        raise UserInputError(f'none of the {len(checked.skipped)} input images can be decoded '
                             f'(first: {checked.skipped[0][0]}: {checked.skipped[0][1]})')
    for path, reason in checked.skipped:
        print(f'skipped {path}: {reason}', file=stream or sys.stderr, flush=True)
    return checked


def detect_images(config: ConfigLike, checkpoint: str, inputs: Sequence[str],
                  out_dir: str = 'outputs/infer', device: str = 'auto', score_thr: float = 0.3,
                  batch_size: int = 1, save_per_image: bool = False, draw: bool = True,
                  cfg_options: Optional[Mapping[str, Any]] = None,
                  show_progress: bool = True, *, precision: str = 'auto',
                  deploy: bool = True, strict: bool = True,
                  verbose: bool = False) -> List[Dict[str, Any]]:
    """Detect objects in image files and folders with mmdet's ``DetInferencer``.

    Writes ``out_dir/vis/<image>`` (drawn detections, unless ``draw`` is False),
    ``out_dir/detections.json`` (one entry per image: ``image``, ``width``, ``height``,
    ``detections`` with ``bbox`` x1,y1,x2,y2 in original pixels, ``score``, ``label``,
    ``class``; scores >= ``score_thr``) and, with ``save_per_image``, DetInferencer's
    ``preds/*.json``. Returns the list written to detections.json.

    Before the model runs: the device, the checkpoint (exists, weights-only, fits the config;
    ``strict=False`` loads only the tensors that fit) and every image are checked; an image
    that cannot be decoded is skipped and named on stderr. ``show_progress``: count, rate and
    ETA lines on stdout. ``verbose``: mmengine's info messages and the known third-party
    warnings on the console (they are noise on a good run).

    ``precision`` (``auto`` | ``fp32`` | ``bf16``) and ``deploy`` (deploy mode, default on):
    see :func:`prepare_inference`; ``auto`` runs bf16 autocast on CPUs with native bf16.
    """
    from mmdet.apis import DetInferencer

    device = resolve_device(device)  # fail early, before loading anything
    if precision not in PRECISIONS:
        raise UserInputError(f'precision must be one of {", ".join(PRECISIONS)}, '
                             f'got {precision!r}')
    cfg = load_config(config, cfg_options)
    images = readable_images(inputs)
    check_checkpoint(cfg, checkpoint, strict=strict)
    if not verbose:
        quiet_console()
    with known_warnings_silenced(not verbose):
        with contextlib.ExitStack() as stack:
            if not verbose:  # mmengine prints "Loads checkpoint by ... backend" with print()
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                                       show_progress=False)
        classes = inferencer.model.dataset_meta.get('classes', ())
        choice = prepare_inference(inferencer.model, precision, deploy)
        os.makedirs(out_dir, exist_ok=True)
        files = images.readable
        progress = Progress(len(files), 'images', 'infer') if show_progress else None
        predictions: List[dict] = []
        step = max(int(batch_size), 1) * 4  # a few batches per call: one progress line each
        with choice.autocast():
            for i in range(0, len(files), step):
                chunk = files[i:i + step]
                result = inferencer(chunk, batch_size=batch_size, out_dir=out_dir,
                                    pred_score_thr=score_thr, no_save_vis=not draw,
                                    no_save_pred=not save_per_image)
                predictions += result['predictions']
                if progress is not None:
                    progress.update(len(chunk))
        if progress is not None:
            progress.done()
    entries = [detections_entry(path, *images.sizes[path], pred['bboxes'], pred['scores'],
                                pred['labels'], classes, score_thr)
               for path, pred in zip(files, predictions)]
    with open(osp.join(out_dir, 'detections.json'), 'w') as f:
        json.dump(entries, f, indent=1)
    return entries
