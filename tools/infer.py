"""Run a trained detector on images through ``mmdet.apis.DetInferencer``.

Examples::

    python tools/infer.py CONFIG CHECKPOINT image.jpg
    python tools/infer.py CONFIG CHECKPOINT data/synthetic/val --out-dir outputs/infer \
        --device cpu --score-thr 0.3

Before the model runs, the checkpoint is checked against the config (arch, number of
classes, keys: one line ``error: ...`` and exit status 2 when it does not fit; ``--no-strict``
loads only the tensors that fit) and every image is decoded once: one that cannot be (empty,
truncated, not an image) is skipped with a ``skipped <file>: <reason>`` line on stderr and the
others run. Progress lines (count, rate, ETA) on stdout; ``--verbose`` adds mmengine's messages
and the known third-party warnings.

Writes, under ``--out-dir``:

* ``vis/<image name>``: each image with its detections drawn (boxes, class, score);
* ``detections.json``: one entry per image, ``{"image": path, "width", "height",
  "detections": [{"bbox": [x1, y1, x2, y2], "score", "label", "class"}, ...]}``
  (boxes in the original image's pixel coordinates, scores >= ``--score-thr``);
* with ``--save-per-image``: DetInferencer's ``preds/<image name>.json`` files as well.

Speed: the model runs in deploy mode (BatchNorms folded, conv+ReLU merged; ``--no-fuse`` to
opt out) and, with ``--precision auto`` (the default), in bf16 autocast + channels_last on a
CPU that runs bf16 natively (AMX-BF16 or AVX512-BF16), fp32 elsewhere and on CUDA; the
choice and its reason are printed (docs/precision.md).
"""
import argparse
import os.path as osp
import sys

from mmengine.config import DictAction

from efficientvit_det.apis import detect_images
from efficientvit_det.cli import run_tool, wrote
from efficientvit_det.inference import PRECISIONS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Detect objects in images')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+', help='image files and/or folders of images')
    parser.add_argument('--out-dir', default='outputs/infer', help='output folder')
    parser.add_argument('--device', default='auto',
                        help="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='minimum score of the boxes drawn and written to the JSON')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--save-per-image', action='store_true',
                        help="also write DetInferencer's preds/<image>.json files")
    parser.add_argument('--no-vis', action='store_true', help='do not write images')
    parser.add_argument('--precision', choices=PRECISIONS, default='auto',
                        help='auto: bf16 on CPUs with native bf16 (AMX/AVX512-BF16), else fp32 '
                             '(default: %(default)s)')
    parser.add_argument('--no-fuse', action='store_true',
                        help='do not put the model in deploy mode (BatchNorm folding)')
    parser.add_argument('--no-strict', action='store_true',
                        help='load only the tensors of the checkpoint that fit the config '
                        'instead of stopping at the first difference')
    parser.add_argument('--verbose', action='store_true',
                        help="mmengine's messages and third-party warnings on the console")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, xxx=yyy format')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    entries = detect_images(args.config, args.checkpoint, args.inputs, args.out_dir,
                            args.device, args.score_thr, args.batch_size,
                            args.save_per_image, not args.no_vis, args.cfg_options,
                            precision=args.precision, deploy=not args.no_fuse,
                            strict=not args.no_strict, verbose=args.verbose)
    n = sum(len(e['detections']) for e in entries)
    print(f'{len(entries)} images, {n} detections (score >= {args.score_thr})')
    if not args.no_vis:
        wrote('drawn images', osp.join(args.out_dir, 'vis'))
    if args.save_per_image:
        wrote('per image', osp.join(args.out_dir, 'preds'))
    wrote('detections', osp.join(args.out_dir, 'detections.json'))
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
