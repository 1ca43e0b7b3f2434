"""A real learning check, through tools/demo.py (generate -> train -> COCO eval -> infer):
after a short training on an easy generated split, bbox mAP clears a threshold that the
untrained (initialised) model cannot reach.

Measured on the development machine (2 cores, seed 0, this exact setting): untrained
mAP 0.000 / AP50 0.000 (scores of all boxes kept), trained mAP ~0.24 / AP50 ~0.43 after 120
iterations (~30 s). Thresholds: trained mAP >= 0.10 and AP50 >= 0.25; untrained mAP < 0.02.
"""
import json
import os
import os.path as osp
import re
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, TOOLS, run, write_tiny_config  # noqa: E402

TRAINED_MAP_MIN, TRAINED_AP50_MIN, UNTRAINED_MAP_MAX = 0.10, 0.25, 0.02


def test_short_training_learns(tmp_path):
    data, work = tmp_path / 'data', tmp_path / 'work'
    cfg = write_tiny_config(tmp_path / 'learn.py', data, size=128, max_epochs=8,
                            batch_size=8)
    # 120 easy images x 8 epochs at batch 8 = 120 iterations; 30 validation images
    run([PY, osp.join(TOOLS, 'demo.py'), '--config', cfg, '--data-root', data,
         '--work-dir', work, '--num-train', '120', '--num-val', '30', '--size', '128',
         '--difficulty', 'easy', '--epochs', '8', '--num-vis', '3', '--seed', '0'],
        timeout=900)
    with open(work / 'summary.json') as f:
        summary = json.load(f)
    trained_map, trained_ap50 = summary['bbox_mAP'], summary['bbox_mAP_50']

    # demo outputs: visualisations + detections JSON of 3 validation images
    assert sorted(os.listdir(summary['visualisations'])) == [
        '000000.jpg', '000001.jpg', '000002.jpg']
    with open(summary['detections_json']) as f:
        assert len(json.load(f)) == 3

    # the same model before training: initialised weights, every box kept (score_thr 0)
    import efficientvit_det  # noqa: F401
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(cfg).model)
    model.init_weights()
    init_ckpt = tmp_path / 'untrained.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), init_ckpt)
    r = run([PY, osp.join(TOOLS, 'test.py'), cfg, init_ckpt, '--work-dir', tmp_path / 't0',
             '--cfg-options', 'model.test_cfg.score_thr=0.0'])
    m = re.search(r'coco/bbox_mAP: ([\d.]+)\s+coco/bbox_mAP_50: ([\d.]+)', r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-3000:]
    untrained_map, untrained_ap50 = float(m.group(1)), float(m.group(2))

    print(f'untrained mAP {untrained_map:.3f} AP50 {untrained_ap50:.3f}; '
          f'trained mAP {trained_map:.3f} AP50 {trained_ap50:.3f}')
    assert untrained_map < UNTRAINED_MAP_MAX
    assert trained_map >= TRAINED_MAP_MIN, summary
    assert trained_ap50 >= TRAINED_AP50_MIN, summary
    assert trained_map > 5 * max(untrained_map, 0.001)
