"""Run a trained detector on images through ``mmdet.apis.DetInferencer``.

Examples::

    python tools/infer.py CONFIG CHECKPOINT demo.jpg
    python tools/infer.py CONFIG CHECKPOINT data/synthetic/val --out-dir outputs/infer \
        --device cpu --score-thr 0.3

Writes, under ``--out-dir``:

* ``vis/<image name>``: each image with its detections drawn (boxes, class, score);
* ``detections.json``: one entry per image, ``{"image": path, "width", "height",
  "detections": [{"bbox": [x1, y1, x2, y2], "score", "label", "class"}, ...]}``
  (boxes in the original image's pixel coordinates, scores >= ``--score-thr``);
* with ``--save-per-image``: DetInferencer's ``preds/<image name>.json`` files as well.
"""
import argparse
import json
import os
import os.path as osp
import sys

_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Detect objects in images')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('inputs', nargs='+', help='image files and/or folders of images')
    parser.add_argument('--out-dir', default='outputs/infer', help='output folder')
    parser.add_argument('--device', default='auto',
                        help="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or "
                        "'cuda:N'")
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='minimum score of the boxes drawn and written to the JSON')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--save-per-image', action='store_true',
                        help="also write DetInferencer's preds/<image>.json files")
    parser.add_argument('--no-vis', action='store_true', help='do not write images')
    parser.add_argument('--cfg-options', nargs='+', default=None,
                        help='override config entries, xxx=yyy format')
    return parser.parse_args(argv)


def resolve_device(device):
    import torch
    if device == 'auto':
        return 'cuda:0' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f'--device {device}: CUDA is not available on this machine '
                         '(use --device cpu or auto)')
    if device != 'cpu' and not device.startswith('cuda'):
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def collect_images(inputs):
    files = []
    for item in inputs:
        if osp.isdir(item):
            found = sorted(
                osp.join(item, f) for f in os.listdir(item)
                if f.lower().endswith(IMG_EXTENSIONS))
            if not found:
                raise SystemExit(f'no images ({", ".join(IMG_EXTENSIONS)}) in {item}')
            files.extend(found)
        elif osp.isfile(item):
            files.append(item)
        else:
            raise SystemExit(f'input not found: {item}')
    names = [osp.basename(f) for f in files]
    if len(set(names)) != len(names):
        print('warning: several inputs share a file name; their visualisations overwrite '
              'each other in vis/', file=sys.stderr)
    return files


def build_inferencer(config, checkpoint, device='auto', cfg_options=None,
                     show_progress=True):
    import efficientvit_det  # noqa: F401  (registers modules, checkpoint compatibility)
    from mmdet.apis import DetInferencer
    from mmengine.config import Config, DictAction

    cfg = Config.fromfile(config)
    if cfg_options:
        # reuse mmengine's parser of "key=value" overrides
        parser = argparse.ArgumentParser()
        parser.add_argument('--o', nargs='+', action=DictAction)
        cfg.merge_from_dict(parser.parse_args(['--o', *cfg_options]).o)
    return DetInferencer(model=cfg, weights=checkpoint, device=resolve_device(device),
                         show_progress=show_progress)


def run(config, checkpoint, inputs, out_dir='outputs/infer', device='auto', score_thr=0.3,
        batch_size=1, save_per_image=False, no_vis=False, cfg_options=None,
        show_progress=True):
    """Detect objects in ``inputs``; returns the list written to detections.json."""
    device = resolve_device(device)  # fail early, before loading anything
    files = collect_images(inputs)
    inferencer = build_inferencer(config, checkpoint, device, cfg_options, show_progress)
    classes = inferencer.model.dataset_meta.get('classes', ())
    os.makedirs(out_dir, exist_ok=True)
    result = inferencer(files, batch_size=batch_size, out_dir=out_dir,
                        pred_score_thr=score_thr, no_save_vis=no_vis,
                        no_save_pred=not save_per_image)

    from PIL import Image
    entries = []
    for path, pred in zip(files, result['predictions']):
        with Image.open(path) as im:
            width, height = im.size
        dets = []
        for box, score, label in zip(pred['bboxes'], pred['scores'], pred['labels']):
            if score < score_thr:
                continue
            dets.append(dict(bbox=[round(float(v), 2) for v in box],
                             score=round(float(score), 4), label=int(label),
                             **{'class': classes[label] if label < len(classes) else str(label)}))
        entries.append(dict(image=path, width=width, height=height, detections=dets))
    with open(osp.join(out_dir, 'detections.json'), 'w') as f:
        json.dump(entries, f, indent=1)
    return entries


def main(argv=None):
    args = parse_args(argv)
    entries = run(args.config, args.checkpoint, args.inputs, args.out_dir, args.device,
                  args.score_thr, args.batch_size, args.save_per_image, args.no_vis,
                  args.cfg_options)
    n = sum(len(e['detections']) for e in entries)
    print(f'{len(entries)} images, {n} detections (score >= {args.score_thr})')
    if not args.no_vis:
        print(f'visualisations: {osp.join(args.out_dir, "vis")}')
    print(f'detections:     {osp.join(args.out_dir, "detections.json")}')


if __name__ == '__main__':
    main()
