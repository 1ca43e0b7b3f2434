"""What the tools print and write on a good run: progress lines, where files went, scores in one
format, labels inside the picture, nothing the user did not ask for on the console; the arch of
a classification checkpoint read from it; what the tools write ignored by git."""
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import DEMO_CONFIG, PY, ROOT, TOOLS, make_dataset, run  # noqa: E402


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The demo config on a tiny copy of its dataset, with a random-weight checkpoint."""
    from efficientvit_det.apis import init_detector
    from efficientvit_det.datasets.synthetic import CLASSES

    base = tmp_path_factory.mktemp('tools_output')
    data = make_dataset(base / 'data', num_train=2, num_val=3, size=128, seed=0)
    ckpt = base / 'demo.pth'
    torch.save({'meta': {'dataset_meta': {'classes': CLASSES}},
                'state_dict': init_detector(DEMO_CONFIG).state_dict()}, ckpt)
    options = ['--cfg-options', f'test_dataloader.dataset.data_root={data}/',
               f'test_evaluator.ann_file={data}/annotations/instances_val.json']
    return base, data, str(ckpt), options


def test_test_tool_with_tta_and_show_dir_prints_progress_metrics_and_paths(demo):
    """--tta on the demo config (its base config carries tta_model / tta_pipeline), progress
    lines, the metrics, where --show-dir and --out wrote; no config dump on the console."""
    base, _, ckpt, options = demo
    show, out = base / 'vis', base / 'preds.pkl'
    r = run([PY, osp.join(TOOLS, 'test.py'), DEMO_CONFIG, ckpt, '--tta', '--show-dir', show,
             '--out', out, '--work-dir', base / 'w', *options])
    assert re.search(r'^  test \(TTA\): 3 images in \d+:\d\d, [\d.]+ images/s$', r.stdout, re.M), \
        r.stdout
    assert re.search(r'^coco/bbox_mAP: [\d.]+  coco/bbox_mAP_50: ', r.stdout, re.M), r.stdout
    assert f'drawn images:    {show}' in r.stdout and f'predictions:     {out}' in r.stdout
    assert sorted(os.listdir(show)) == ['000000.jpg', '000001.jpg', '000002.jpg']
    assert 'Config:' not in r.stdout and 'Environment' not in r.stdout
    assert 'Loading and preparing results' not in r.stdout  # pycocotools, in the log file
    assert 'Warning' not in r.stderr, r.stderr  # the known third-party noise is silenced


def test_infer_prints_progress_and_paths_and_nothing_else(demo):
    base, data, ckpt, _ = demo
    out = base / 'infer'
    r = run([PY, osp.join(TOOLS, 'infer.py'), DEMO_CONFIG, ckpt, osp.join(data, 'val'),
             '--out-dir', out, '--device', 'cpu'])
    assert re.search(r'^  infer: 3 images in \d+:\d\d', r.stdout, re.M), r.stdout
    assert f'drawn images:    {out / "vis"}' in r.stdout
    assert f'detections:      {out / "detections.json"}' in r.stdout
    noise = [ln for ln in (r.stdout + r.stderr).splitlines()
             if re.search(r'warn|deprecat|Failed to|Loads checkpoint', ln, re.I)]
    assert not noise, noise


def test_labels_read_class_and_score_and_stay_inside_the_picture(monkeypatch):
    """mmdet draws 'circle: 84.6' at the box corner, past the right edge on a small image;
    the configs' visualizer draws 'circle 0.85' (the demo grid's format) inside it."""
    import numpy as np
    from mmdet.registry import VISUALIZERS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.structures import InstanceData
    from mmengine.visualization import Visualizer

    cfg = Config.fromfile(DEMO_CONFIG)
    vis = VISUALIZERS.build(dict(cfg.visualizer, name='labels_test'))
    vis.dataset_meta = dict(classes=('circle', 'square'), palette=[(255, 0, 0), (0, 255, 0)])
    drawn = []
    real = Visualizer.draw_texts

    def spy(self, texts, positions, *args, **kwargs):
        drawn.append((texts, np.asarray(positions, dtype=float).reshape(-1)))
        return real(self, texts, positions, *args, **kwargs)

    monkeypatch.setattr(Visualizer, 'draw_texts', spy)
    sample = DetDataSample()
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor([[100., 40., 127., 60.], [2., 2., 30., 30.]]),
        scores=torch.tensor([0.8459, 0.5]), labels=torch.tensor([0, 1]))
    vis.add_datasample('x', np.zeros((64, 128, 3), np.uint8), sample, draw_gt=False,
                       pred_score_thr=0.3)
    texts = [t for t, _ in drawn]
    assert texts == ['circle 0.85', 'square 0.50'], texts
    x = drawn[0][1][0]
    assert x < 100  # moved left from the box's corner so that the label fits
    from efficientvit_det.engine.visualization import _text_size_px
    width, _ = _text_size_px('circle 0.85', int(13 * 0.5), vis.dpi)
    assert x + width <= 128 + 1e-6


def test_convert_checkpoint_reads_the_arch_from_the_checkpoint(tmp_path):
    """No --arch: the checkpoint's embed dims / depths say m1 (it used to assume m4)."""
    from efficientvit_det.models.backbones.efficientvit import EfficientViT

    src = tmp_path / 'm1.pth'
    torch.save({'model': EfficientViT('m1').state_dict()}, src)
    out = tmp_path / 'out.pth'
    r = run([PY, osp.join(TOOLS, 'convert_checkpoint.py'), src, out])
    assert 'arch m1 (read from the checkpoint' in r.stdout, r.stdout
    assert torch.load(out, weights_only=True)['meta']['arch'] == 'm1'
    r = run([PY, osp.join(TOOLS, 'convert_checkpoint.py'), src, tmp_path / 'o2.pth', '--arch',
             'm4'], check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ')
    assert 'm4' in lines[0] and '(128, 144, 192)' in lines[0]


def test_what_the_tools_write_is_ignored_by_git():
    if not osp.isdir(osp.join(ROOT, '.git')):
        pytest.skip('not a git checkout')
    paths = ['outputs/infer/vis/a.jpg', 'vis/000000.jpg', 'work_dirs/demo/epoch_8.pth',
             'checkpoints/efficientvit_m4.pth', 'retinanet_m4.onnx', 'results.pkl', 'dets.json',
             'data/synthetic/val/000000.jpg']
    r = subprocess.run(['git', 'check-ignore', '--no-index', *paths], cwd=ROOT,
                       capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(paths), r.stdout + r.stderr
    tracked = subprocess.run(['git', 'check-ignore', '--no-index', 'configs/x.py',
                              'docs/install.md', 'tools/infer.py'], cwd=ROOT,
                             capture_output=True, text=True)
    assert tracked.stdout == ''
