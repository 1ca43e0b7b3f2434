"""Inference precision and deploy mode in the tools (issue 15).

* the ``auto`` rule (bf16 on CPUs with native bf16: AMX-BF16 or AVX512-BF16; fp32 elsewhere
  and on CUDA), and the capability detection against ``/proc/cpuinfo``;
* ``prepare_model``: channels_last, head outputs back to float32 (mmcv's CPU NMS rejects bf16);
* deploy mode in ``tools/infer.py`` / ``detect_images``: detections equal the unfused model's;
* accuracy: a small detector trained here (RetinaNet-M0, 64-wide neck/head, 128 px, 120 easy
  synthetic images, 8 epochs: the recipe of test_workflow_learning.py), evaluated by
  ``tools/test.py`` with ``--precision fp32`` and ``--precision bf16`` on 40 validation
  images. Tolerance: |bf16 mAP - fp32 mAP| <= 0.01 (1 AP point). Measured on the development
  machine (AMD EPYC Zen 4, AVX512-BF16): fp32 0.164, bf16 0.159 (-0.5 points). The bound is
  wider than the issue's 0.3 points for the trained demo model (docs/precision.md): this
  small, briefly trained model scores its boxes with small margins, and 40 images make each
  flipped detection weigh more. A real precision bug (e.g. bf16 box deltas, a broken
  channels_last conversion) costs far more than a point.
"""
from __future__ import annotations

import json
import os.path as osp
import re
import sys

import pytest
import torch

from efficientvit_det import cpu
from efficientvit_det.apis import detect_images, init_detector
from efficientvit_det.engine import InferenceOptimizationHook
from efficientvit_det.inference import precision as prec

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _workflow_common import PY, TOOLS, make_dataset, run, write_tiny_config  # noqa: E402

AP_TOL = 0.01
MAP_RE = re.compile(r'coco/bbox_mAP: ([\d.]+)')


def _support(amx=False, avx=False, onednn=True):
    return cpu.CpuInfo(name='Test CPU', avx2=True, avx512=avx, avx512_bf16=avx, amx_bf16=amx,
                       avx512_vnni=avx, avx_vnni=False, amx_int8=amx, onednn_bf16=onednn)


# --------------------------------------------------------------------------------------------
# the auto rule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('support,expected', [
    (_support(amx=True, avx=True), 'bf16'),    # Sapphire Rapids and later
    (_support(avx=True), 'bf16'),              # Zen 4, Cooper Lake
    (_support(), 'fp32'),                      # AVX512 or AVX2 without bf16 instructions
    (_support(amx=True, onednn=False), 'fp32'),  # a torch build without oneDNN bf16
])
def test_auto_rule_on_cpu(monkeypatch, support, expected):
    monkeypatch.setattr(prec, 'cpu_info', lambda: support)
    choice = prec.resolve_precision('auto', 'cpu')
    assert choice.name == expected
    assert choice.reason.startswith('auto: ')
    assert choice.channels_last == (expected == 'bf16')
    assert prec.resolve_precision('fp32', 'cpu').name == 'fp32'


def test_auto_keeps_fp32_on_cuda(monkeypatch):
    monkeypatch.setattr(prec, 'cpu_info', lambda: _support(amx=True))
    choice = prec.resolve_precision('auto', 'cuda:0')
    assert (choice.name, choice.device_type) == ('fp32', 'cuda')


def test_explicit_bf16_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(prec, 'cpu_info', lambda: _support())
    with pytest.warns(UserWarning, match='emulated'):
        assert prec.resolve_precision('bf16', 'cpu').name == 'bf16'


def test_bad_precision_names_the_choices():
    with pytest.raises(ValueError, match='auto, fp32, bf16'):
        prec.resolve_precision('fp16', 'cpu')
    with pytest.raises(ValueError, match='auto, fp32, bf16'):
        InferenceOptimizationHook(precision='half')


def test_capability_agrees_with_proc_cpuinfo():
    """cpuinfo (through torch) against the kernel's CPU flags."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next(line for line in f if line.startswith('flags')).split()
    except (OSError, StopIteration):
        pytest.skip('no /proc/cpuinfo flags line on this system')
    support = cpu.cpu_info()
    assert support.amx_bf16 == ('amx_bf16' in flags)
    assert support.avx512_bf16 == ('avx512_bf16' in flags)
    assert support.avx512 == ('avx512f' in flags)
    assert support.avx512_vnni == ('avx512_vnni' in flags)
    line = support.describe()
    assert ('AVX512-BF16' in line) == support.avx512_bf16


# --------------------------------------------------------------------------------------------
# prepare_model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('tiny')
    return write_tiny_config(tmp / 'tiny.py', tmp / 'data', size=128)


def test_prepare_model_bf16_casts_head_outputs_and_uses_channels_last(tiny_cfg):
    from efficientvit_det.deploy import preprocess_images
    from efficientvit_det.deploy.end2end import synthetic_image
    model = init_detector(tiny_cfg, cfg_options={'model.test_cfg.score_thr': 0.0})
    choice = prec.Precision('bf16', 'bf16', 'cpu', 'test')
    prec.prepare_model(model, choice)
    conv = model.bbox_head.retina_cls.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.float32
    inputs, samples = preprocess_images(model.cfg, [synthetic_image((100, 140), 0)])
    with torch.no_grad(), choice.autocast():
        cls_scores, bbox_preds = model.bbox_head(model.extract_feat(inputs))
        results = model.predict(inputs, samples)  # mmcv's NMS needs float32 boxes
    assert all(t.dtype == torch.float32 for t in cls_scores + bbox_preds)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts per op
    assert len(results[0].pred_instances.bboxes) > 0
    assert prec.prepare_model(model, choice) is model  # idempotent
    with pytest.raises(RuntimeError, match='already prepared'):
        prec.prepare_model(model, prec.Precision('fp32', 'fp32', 'cpu', 'test'))


# --------------------------------------------------------------------------------------------
# a trained model: deploy equality, bf16 accuracy, the tools' defaults
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(config, checkpoint, validation image folder) of a short training run."""
    tmp = tmp_path_factory.mktemp('trained')
    data = make_dataset(tmp / 'data', 120, 40, size=128, seed=0, difficulty='easy')
    cfg = write_tiny_config(tmp / 'learn.py', data, size=128, max_epochs=8, batch_size=8)
    run([PY, osp.join(TOOLS, 'train.py'), cfg, '--work-dir', tmp / 'work', '--no-validate',
         '--seed', '0'], timeout=1800)
    return cfg, str(tmp / 'work' / 'epoch_8.pth'), osp.join(data, 'val')


def _test_map(cfg, ckpt, work_dir, *options):
    r = run([PY, osp.join(TOOLS, 'test.py'), cfg, ckpt, '--work-dir', work_dir, *options])
    out = r.stdout + r.stderr
    m = MAP_RE.search(out)
    assert m, out[-3000:]
    return float(m.group(1)), out


def test_bf16_map_close_to_fp32(trained, tmp_path):
    cfg, ckpt, _ = trained
    fp32_map, fp32_log = _test_map(cfg, ckpt, tmp_path / 'fp32', '--precision', 'fp32')
    bf16_map, bf16_log = _test_map(cfg, ckpt, tmp_path / 'bf16', '--precision', 'bf16')
    assert 'precision: fp32 on cpu' in fp32_log
    assert 'precision: bf16 + channels_last on cpu' in bf16_log
    print(f'bbox mAP fp32 {fp32_map:.3f}, bf16 {bf16_map:.3f}')
    assert fp32_map >= 0.08, 'the model did not learn: the comparison would be meaningless'
    assert abs(bf16_map - fp32_map) <= AP_TOL


def test_deploy_mode_detections_equal_unfused(trained, tmp_path):
    cfg, ckpt, val = trained
    kw = dict(device='cpu', score_thr=0.05, draw=False, show_progress=False, precision='fp32')
    fused = detect_images(cfg, ckpt, [val], str(tmp_path / 'fused'), deploy=True, **kw)
    plain = detect_images(cfg, ckpt, [val], str(tmp_path / 'plain'), deploy=False, **kw)
    assert len(fused) == len(plain) == 40
    total = 0
    for a, b in zip(fused, plain):
        assert [d['label'] for d in a['detections']] == [d['label'] for d in b['detections']]
        for da, db in zip(a['detections'], b['detections']):
            assert max(abs(x - y) for x, y in zip(da['bbox'], db['bbox'])) <= 0.02  # 2 decimals
            assert abs(da['score'] - db['score']) <= 2e-4
        total += len(a['detections'])
    assert total > 40


def test_infer_defaults_print_the_precision_once(trained, tmp_path):
    cfg, ckpt, val = trained
    r = run([PY, osp.join(TOOLS, 'infer.py'), cfg, ckpt, val, '--out-dir', tmp_path / 'out',
             '--no-vis', '--device', 'cpu'])
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if 'precision: ' in ln]
    assert len(lines) == 1, lines
    expected = prec.resolve_precision('auto', 'cpu')
    assert f'precision: {expected.name}' in lines[0] and '(auto: ' in lines[0]
    with open(tmp_path / 'out' / 'detections.json') as f:
        assert len(json.load(f)) == 40
