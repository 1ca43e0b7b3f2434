#!/usr/bin/env python
"""Convert an MSRA (original) or timm EfficientViT classification checkpoint into a clean
backbone checkpoint (our key layout, 7x7 bias tables, no classifier keys).

    python tools/convert_checkpoint.py efficientvit_m4.pth checkpoints/efficientvit_m4_backbone.pth --arch m4

The output loads with ``backbone.init_cfg=dict(type='Pretrained', checkpoint=OUT)``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='MSRA or timm checkpoint (.pth)')
    p.add_argument('dst', help='output backbone checkpoint')
    p.add_argument('--arch', default='m4', help="backbone arch the weights belong to ('m0'..'m5')")
    p.add_argument('--force', action='store_true', help='overwrite dst if it exists')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from efficientvit_det.models.backbones.efficientvit import EfficientViT
    from efficientvit_det.models.backbones.efficientvit_checkpoint import load_pretrained

    if os.path.exists(args.dst) and not args.force:
        print(f'error: {args.dst} exists; pass --force to overwrite', file=sys.stderr)
        return 2
    backbone = EfficientViT(args.arch)
    missing, unexpected = load_pretrained(backbone, args.src)
    if missing:
        print(f'error: the checkpoint lacks {len(missing)} backbone tensors (e.g. {missing[:3]}); '
              'not writing a partial backbone', file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    tmp = args.dst + '.tmp'
    torch.save({'state_dict': backbone.state_dict(), 'meta': {'arch': args.arch, 'source': args.src}}, tmp)
    os.replace(tmp, args.dst)  # never leave a half-written file under the final name
    print(f'wrote {args.dst}: {len(backbone.state_dict())} tensors (arch {args.arch}); '
          f'ignored {len(unexpected)} unexpected keys')
    return 0


if __name__ == '__main__':
    sys.exit(main())
