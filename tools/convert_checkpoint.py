#!/usr/bin/env python
"""Convert EfficientViT checkpoints to this project's layout.

Classification (MSRA original or timm) -> a clean backbone checkpoint (our key layout, 7x7 bias
tables, no classifier keys)::

    python tools/convert_checkpoint.py efficientvit_m4.pth \
        checkpoints/efficientvit_m4_backbone.pth --arch m4

The output loads with ``backbone.init_cfg=dict(type='Pretrained', checkpoint=OUT)``. Without
``--arch`` the arch is read from the checkpoint (its embed dims and depths: m0..m5); a
checkpoint of another arch than ``--arch`` is an error naming both.

Detector (the original code's released mmdet 2.x files, e.g.
``retinanet_efficientvit_m4_fpn_1x_coco.pth``) -> the same detector in our layout for good
(backbone and neck keys renamed, ``attention_bias_idxs`` buffers dropped, mmdet 2 ``CLASSES``
-> ``dataset_meta``, the optimizer state left out); ``--config`` also loads the result strictly
into that config to check it::

    python tools/convert_checkpoint.py retinanet_efficientvit_m4_fpn_1x_coco.pth \
        checkpoints/retinanet_efficientvit_m4_coco.pth \
        --config configs/retinanet_efficientvit_m4_coco.py

(The released files also load as they are: this rewrite only saves the conversion at every load.)

An existing DST is kept unless ``--force`` is given. Mistakes end the tool with one line
``error: ...`` and exit status 2 (efficientvit_det.cli).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from efficientvit_det.cli import fail, run_tool, wrote


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src',
                   help='MSRA / timm classification checkpoint, or a detector checkpoint')
    p.add_argument('dst', help='output checkpoint')
    p.add_argument('--arch', default=None,
                   help="classification checkpoints: the backbone arch ('m0'..'m5'; "
                   'default: read from the checkpoint)')
    p.add_argument('--config',
                   help='detector checkpoints: load the result strictly into this config')
    p.add_argument('--force', action='store_true', help='overwrite dst if it exists')
    return p.parse_args(argv)


def _save_atomic(obj: dict, dst: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, dst)  # never leave a half-written file under the final name


def checkpoint_arch(checkpoint: dict) -> str:
    """The preset (m0..m5) of a classification checkpoint, from its embed dims and depths."""
    from efficientvit_det.checkpoint.backbone import detect_layout, infer_arch, msra_keys_to_ours, unwrap_state_dict
    from efficientvit_det.checkpoint.detector import arch_name

    sd = dict(unwrap_state_dict(checkpoint))
    if detect_layout(sd) == 'msra':
        msra_keys_to_ours(sd)
    dims, depths = infer_arch(sd)
    name = arch_name(dims, depths)
    if name == 'custom':
        fail(f'cannot tell the arch of the checkpoint (embed_dims {dims}, depths {depths} is '
             'none of m0..m5): pass --arch')
    return name


def convert_backbone(args: argparse.Namespace, checkpoint: dict) -> int:
    from efficientvit_det.checkpoint.backbone import load_pretrained
    from efficientvit_det.models.backbones.efficientvit import EfficientViT

    arch = args.arch
    if arch is None:
        arch = checkpoint_arch(checkpoint)
        print(f'arch {arch} (read from the checkpoint; --arch to set it)')
    backbone = EfficientViT(arch)
    missing, unexpected = load_pretrained(backbone, args.src)
    if missing:
        fail(f'the checkpoint lacks {len(missing)} backbone tensors (e.g. {missing[:3]}); '
             'not writing a partial backbone')
    _save_atomic({'state_dict': backbone.state_dict(),
                  'meta': {'arch': arch, 'source': args.src}}, args.dst)
    print(f'{len(backbone.state_dict())} tensors (arch {arch}); ignored {len(unexpected)} '
          'unexpected keys')
    wrote('backbone', args.dst)
    return 0


def convert_detector(args: argparse.Namespace, checkpoint: dict) -> int:
    from efficientvit_det.apis import init_detector
    from efficientvit_det.checkpoint.backbone import CheckpointLayoutError
    from efficientvit_det.checkpoint.detector import convert_detector_checkpoint

    try:
        converted, report = convert_detector_checkpoint(checkpoint)
    except CheckpointLayoutError as e:
        fail(f'{args.src}: {e}')
    converted['meta'].setdefault('source_meta', {})['converted_from'] = os.path.basename(args.src)
    _save_atomic(converted, args.dst)
    for line in report:
        print(line)
    print(f'{len(converted["state_dict"])} tensors')
    if args.config:
        init_detector(args.config, args.dst, device='cpu', strict=True)  # raises on a mismatch
        print(f'checked: loads strictly into {args.config}')
    wrote('detector', args.dst)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from efficientvit_det.checkpoint import load_checkpoint_file
    from efficientvit_det.checkpoint.detector import is_detector_checkpoint

    if os.path.exists(args.dst) and not args.force:
        fail(f'{args.dst} exists; pass --force to overwrite')
    checkpoint = load_checkpoint_file(args.src)
    if is_detector_checkpoint(checkpoint):
        return convert_detector(args, checkpoint)
    if args.config:
        fail('--config is for detector checkpoints; this one holds no backbone.* keys')
    return convert_backbone(args, checkpoint)


if __name__ == '__main__':
    sys.exit(run_tool(main))
