"""A real learning check of the demo's recipe, through tools/demo.py (generate -> train ->
COCO eval -> detections -> picture): ``configs/retinanet_efficientvit_m0_demo.py`` as it is,
on the same ``normal`` synthetic task, with a smaller budget (TRAIN_IMAGES images x EPOCHS
epochs instead of 2000 x 12; the cosine schedule shrinks with it), then the same model
untrained, evaluated alike.

Measured on the development machine (2 cores, one thread as the tests run, seed 0, this
exact setting: 500 iterations): untrained mAP 0.001 / AP50 0.005 (every box kept); trained
mAP 0.321 / AP50 0.559, the whole test in about 2 minutes. (The full demo, 2000 iterations:
mAP 0.590 / AP50 0.824.) Thresholds: trained mAP >= 0.25 and AP50 >= 0.45, a margin for
other thread counts and CPUs; untrained mAP < 0.02.
"""
import json
import os
import re
import sys
import textwrap

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _workflow_common import DEMO_CONFIG, PY, TOOLS, run  # noqa: E402

TRAIN_IMAGES, VAL_IMAGES, EPOCHS = 800, 50, 5
TRAINED_MAP_MIN, TRAINED_AP50_MIN, UNTRAINED_MAP_MAX = 0.25, 0.45, 0.02


def _config_on(data_root, path) -> str:
    """The demo config reading its dataset from ``data_root``."""
    root = os.path.abspath(data_root).rstrip('/') + '/'
    with open(path, 'w') as f:
        f.write(textwrap.dedent(f'''
            _base_ = [{DEMO_CONFIG!r}]
            train_dataloader = dict(dataset=dict(data_root={root!r}))
            val_dataloader = dict(dataset=dict(data_root={root!r}))
            test_dataloader = val_dataloader
            val_evaluator = dict(ann_file={root + 'annotations/instances_val.json'!r})
            test_evaluator = val_evaluator
            '''))
    return str(path)


def _untrained_map(cfg: str, tmp_path):
    """mAP / AP50 of the initialised model (score_thr 0: every box kept)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import efficientvit_det  # noqa: F401
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(cfg).model)
    model.init_weights()
    ckpt = tmp_path / 'untrained.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), ckpt)
    r = run([PY, os.path.join(TOOLS, 'test.py'), cfg, ckpt, '--work-dir', tmp_path / 't0',
             '--cfg-options', 'model.test_cfg.score_thr=0.0'])
    m = re.search(r'coco/bbox_mAP: ([\d.]+)\s+coco/bbox_mAP_50: ([\d.]+)', r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_demo_recipe_learns(tmp_path):
    data, work = tmp_path / 'data', tmp_path / 'work'
    run([PY, os.path.join(TOOLS, 'demo.py'), '--data-root', data, '--work-dir', work,
         '--num-train', TRAIN_IMAGES, '--num-val', VAL_IMAGES, '--epochs', EPOCHS,
         '--num-vis', '3', '--seed', '0'], timeout=900)
    with open(work / 'summary.json') as f:
        summary = json.load(f)
    trained_map, trained_ap50 = summary['bbox_mAP'], summary['bbox_mAP_50']

    # the demo's outputs: drawn images, detections JSON and the picture of them all
    assert sorted(os.listdir(summary['visualisations'])) == [
        '000000.jpg', '000001.jpg', '000002.jpg']
    with open(summary['detections_json']) as f:
        assert len(json.load(f)) == 3
    assert os.path.getsize(summary['detections_grid']) > 1000
    assert 0 <= summary['grid_found'] <= summary['grid_objects'] > 0

    untrained_map, untrained_ap50 = _untrained_map(_config_on(data, tmp_path / 'cfg.py'),
                                                   tmp_path)
    print(f'untrained mAP {untrained_map:.3f} AP50 {untrained_ap50:.3f}; '
          f'trained mAP {trained_map:.3f} AP50 {trained_ap50:.3f}')
    assert untrained_map < UNTRAINED_MAP_MAX
    assert trained_map >= TRAINED_MAP_MIN, summary
    assert trained_ap50 >= TRAINED_AP50_MIN, summary
    assert trained_map > 5 * max(untrained_map, 0.001)
