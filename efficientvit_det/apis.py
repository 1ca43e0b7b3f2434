"""What the command-line tools are thin over: configs, detectors, runners, inference.

* :func:`load_config`: a config file (or ``Config``) with ``--cfg-options`` applied;
* :func:`init_detector`: a detector built from a config, its weights loaded through the one
  safe loader (:func:`efficientvit_det.checkpoint.detector.load_detector_checkpoint`: weights-only
  pickles, strict key matching by default), class names from the checkpoint's meta, optionally in deploy mode (:func:`efficientvit_det.deploy.deploy_model`);
* :func:`build_runner` / :func:`setup_cpu_distributed`: an mmengine Runner, with gloo + CPU DDP
  when CUDA is missing;
* :func:`prepare_inference` (from :mod:`efficientvit_det.inference`): deploy mode and the
  inference precision (``auto`` | ``fp32`` | ``bf16``) applied to a built detector;
* :func:`resolve_device`, :func:`collect_images`, :func:`detect_images`: inference on files.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import os.path as osp
import subprocess
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from mmengine.config import Config
from torch import nn

from efficientvit_det.checkpoint.detector import load_detector_checkpoint
from efficientvit_det.deploy import deploy_model, detections_entry
from efficientvit_det.inference import PRECISIONS, prepare_inference

__all__ = ['load_config', 'init_detector', 'load_detector_checkpoint', 'build_runner',
           'setup_cpu_distributed', 'resolve_device', 'collect_images', 'detect_images',
           'prepare_inference', 'IMG_EXTENSIONS']

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
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
        cfg = Config.fromfile(str(config))
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
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    cfg = load_config(config, cfg_options)
    if cfg.model.get('backbone') is not None:
        cfg.model.backbone.pop('init_cfg', None)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_detector_checkpoint(model, checkpoint, strict=strict)
    model.cfg = cfg
    model = model.to(resolve_device(device)).eval()
    return deploy_model(model) if deploy else model


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


def build_runner(cfg: Config):
    """An mmengine Runner for ``cfg`` (``runner_type`` honoured), distributed set-up done."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    setup_cpu_distributed(cfg, cfg.get('launcher', 'none'))
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str = 'auto') -> str:
    """``auto`` -> ``cuda:0`` when available, else ``cpu``; a clear error for CUDA without one."""
    if device == 'auto':
        return 'cuda:0' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'device {device!r}: CUDA is not available on this machine '
                         '(use cpu or auto)')
    if device != 'cpu' and not device.startswith('cuda'):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Image files from files and folders (a folder: its images, sorted)."""
    files: List[str] = []
    for item in inputs:
        if osp.isdir(item):
            found = sorted(osp.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f'no images ({", ".join(IMG_EXTENSIONS)}) in {item}')
            files.extend(found)
        elif osp.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f'input not found: {item}')
    names = [osp.basename(f) for f in files]
    if len(set(names)) != len(names):
        warnings.warn('several inputs share a file name; their drawings overwrite each other',
                      stacklevel=2)
    return files


def detect_images(config: ConfigLike, checkpoint: str, inputs: Sequence[str],
                  out_dir: str = 'outputs/infer', device: str = 'auto', score_thr: float = 0.3,
                  batch_size: int = 1, save_per_image: bool = False, draw: bool = True,
                  cfg_options: Optional[Mapping[str, Any]] = None,
                  show_progress: bool = True, *, precision: str = 'auto',
                  deploy: bool = True) -> List[Dict[str, Any]]:
    """Detect objects in image files and folders with mmdet's ``DetInferencer``.

    Writes ``out_dir/vis/<image>`` (drawn detections, unless ``draw`` is False),
    ``out_dir/detections.json`` (one entry per image: ``image``, ``width``, ``height``,
    ``detections`` with ``bbox`` x1,y1,x2,y2 in original pixels, ``score``, ``label``,
    ``class``; scores >= ``score_thr``) and, with ``save_per_image``, DetInferencer's
    ``preds/*.json``. Returns the list written to detections.json.

    ``precision`` (``auto`` | ``fp32`` | ``bf16``) and ``deploy`` (deploy mode, default on):
    see :func:`prepare_inference`; ``auto`` runs bf16 autocast on CPUs with native bf16.
    """
    from mmdet.apis import DetInferencer
    from PIL import Image

    device = resolve_device(device)  # fail early, before loading anything
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    files = collect_images(inputs)
    cfg = load_config(config, cfg_options)
    inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                               show_progress=show_progress)
    classes = inferencer.model.dataset_meta.get('classes', ())
    choice = prepare_inference(inferencer.model, precision, deploy)
    os.makedirs(out_dir, exist_ok=True)
    with choice.autocast():
        result = inferencer(files, batch_size=batch_size, out_dir=out_dir,
                            pred_score_thr=score_thr, no_save_vis=not draw,
                            no_save_pred=not save_per_image)
    entries = []
    for path, pred in zip(files, result['predictions']):
        with Image.open(path) as im:
            width, height = im.size
        entries.append(detections_entry(path, width, height, pred['bboxes'], pred['scores'],
                                        pred['labels'], classes, score_thr))
    with open(osp.join(out_dir, 'detections.json'), 'w') as f:
        json.dump(entries, f, indent=1)
    return entries
