"""End-to-end ONNX graph (issue 15): anchors, decoding and NMS in the graph, run by
onnxruntime alone, equal to mmdet's ``model.predict``.

The oracle is mmdet itself: ``model.predict`` (test pipeline, data preprocessor, RetinaHead's
``predict_by_feat``, mmcv's ``batched_nms``) on the same image. Detections must match one to
one: same labels, boxes within 1e-3 of their scale, scores within 1e-3 (the issue's
tolerance); in PyTorch, the graph's module must match exactly.

Models: RetinaNet-M0 with a 64-wide neck/head, every weight and BatchNorm statistic randomised
but well conditioned (``randomize_well_conditioned_`` of test_onnx_export.py), so detections
come from all levels and many classes; the test pipeline resizes (keep_ratio) and pads to a
multiple of 32, as the real configs do.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
from test_onnx_export import randomize_well_conditioned_

from efficientvit_det.apis import init_detector, load_config
from efficientvit_det.deploy import deploy_model, preprocess_images
from efficientvit_det.deploy.end2end import (
    DetectorEnd2End,
    compare_detections,
    export_end2end,
    preprocess_spec,
    synthetic_image,
)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
PY = sys.executable
DEMO_CONFIG = osp.join(ROOT, 'configs', 'retinanet_efficientvit_m0_demo.py')
RESIZE = (256, 192)  # test pipeline scale (w, h)
# image sizes (h, w): two aspect ratios, so two network input sizes after resize + padding
IMAGE_SIZES = ((150, 230), (260, 170))
REL_TOL = 1e-3


def write_config(path, extra: str = '') -> str:
    text = f'''
_base_ = [{DEMO_CONFIG!r}]
model = dict(
    backbone=dict(arch='m0'),
    neck=dict(in_channels=[64, 128, 192], out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64, stacked_convs=2))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={RESIZE!r}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
''' + extra
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(config path, checkpoint path, deploy-mode model, image paths)."""
    tmp = tmp_path_factory.mktemp('e2e')
    cfg_path = write_config(tmp / 'cfg.py')
    model = init_detector(cfg_path)
    randomize_well_conditioned_(model, seed=3)
    ckpt = tmp / 'model.pth'
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': {'classes': [f'c{i}' for i in range(6)]}}}, ckpt)
    model = deploy_model(init_detector(cfg_path, str(ckpt)))
    images = []
    for i, hw in enumerate(IMAGE_SIZES):
        path = tmp / f'img{i}.png'
        cv2.imwrite(str(path), synthetic_image(hw, seed=10 + i))
        images.append(str(path))
    return cfg_path, str(ckpt), model, images


def _expected(model, cfg, image):
    inputs, samples = preprocess_images(cfg, [image], model.data_preprocessor)
    with torch.no_grad():
        return inputs, samples[0].metainfo, model.predict(inputs, samples)[0].pred_instances


def test_module_equals_mmdet_predict_exactly(setup):
    cfg_path, _, model, images = setup
    cfg = load_config(cfg_path)
    e2e = DetectorEnd2End(model).eval()
    for image in images:
        inputs, meta, expected = _expected(model, cfg, image)
        assert len(expected.bboxes) > 20, 'too few detections for a meaningful comparison'
        assert len(set(expected.labels.tolist())) > 1
        with torch.no_grad():
            boxes, scores, labels = e2e(inputs, torch.tensor(meta['img_shape'], dtype=torch.float),
                                        torch.tensor(meta['scale_factor'], dtype=torch.float))
        report = compare_detections(boxes.numpy(), scores.numpy(), labels.numpy(), expected,
                                    rel_tol=1e-6, what='DetectorEnd2End')
        assert report['max_box_rel_err'] <= 1e-6


@pytest.fixture(scope='module')
def exported(setup, tmp_path_factory):
    """tools/export_onnx.py --end2end in a subprocess (it verifies against mmdet itself at two
    synthetic image sizes): (onnx file, its --json summary)."""
    cfg_path, ckpt, _, _ = setup
    tmp = tmp_path_factory.mktemp('e2e_cli')
    onnx_file, summary_json = tmp / 'cli.onnx', tmp / 'summary.json'
    r = subprocess.run([PY, osp.join(TOOLS, 'export_onnx.py'), cfg_path, ckpt, '--out',
                        str(onnx_file), '--end2end', '--shape', '192', '256', '--json',
                        str(summary_json)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count('equal to mmdet') == 2, r.stdout
    with open(summary_json) as f:
        return str(onnx_file), json.load(f)


def test_export_verifies_at_two_sizes(exported):
    _, summary = exported
    reports = summary['verification']
    assert len(reports) == 2
    assert len({r['input_shape'] for r in reports}) == 2, 'the two images must differ in size'
    for r in reports:
        assert r['num_dets'] > 20 and r['labels_equal'] and r['max_box_rel_err'] <= REL_TOL


def test_graph_has_nms_and_dynamic_size(exported):
    proto = onnx.load(exported[0])
    ops = {n.op_type for n in proto.graph.node}
    assert {'NonMaxSuppression', 'TopK', 'Range'} <= ops
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    assert dims['input'][0] == 1 and isinstance(dims['input'][2], str) \
        and isinstance(dims['input'][3], str), dims
    assert [o.name for o in proto.graph.output] == ['boxes', 'scores', 'labels']


def test_export_with_no_detections(setup, tmp_path):
    """Initial weights (focal-loss prior: every score < score_thr): zero boxes, no error."""
    cfg_path, _, _, images = setup
    model = deploy_model(init_detector(cfg_path))
    model.init_weights()
    model.eval()
    out = str(tmp_path / 'empty.onnx')
    summary = export_end2end(model, out, load_config(cfg_path), shape=(192, 256),
                             verify_images=images[:1])
    assert summary['verification'][0]['num_dets'] == 0


def test_preprocess_spec_of_the_config(setup):
    spec = preprocess_spec(load_config(setup[0]))
    assert spec['resize'] == dict(scale=list(RESIZE), keep_ratio=True, interpolation='bilinear')
    assert spec['pad_size_divisor'] == 32 and spec['bgr_to_rgb'] is True
    assert spec['mean'] == pytest.approx([123.675, 116.28, 103.53])


def test_unsupported_head_is_refused(tmp_path):
    cfg_path = write_config(tmp_path / 'ctr.py', "model.update(bbox_head=dict("
                            "bbox_coder=dict(add_ctr_clamp=True)))\n")
    with pytest.raises(TypeError, match='add_ctr_clamp'):
        DetectorEnd2End(init_detector(cfg_path))


# tools/onnx_detect_standalone.py with torch, mmdet, mmcv, mmengine and efficientvit_det
# blocked: argv = TOOLS_DIR GRAPH OUT_JSON IMAGE...; also used by test_onnx_int8.py
STANDALONE_RUNNER = '''
import json, sys
import numpy as np
for name in ("torch", "mmdet", "mmcv", "mmengine", "efficientvit_det"):
    sys.modules[name] = None  # importing any of them now raises ImportError
sys.path.insert(0, sys.argv[1])
import onnx_detect_standalone as s
import onnxruntime as ort
import cv2
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
spec = s.read_metadata(session)["preprocess"]
out = {}
for path in sys.argv[4:]:
    img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    boxes, scores, labels = s.detect(session, spec, img)
    out[path] = dict(boxes=boxes.tolist(), scores=scores.tolist(), labels=labels.tolist())
with open(sys.argv[3], "w") as f:
    json.dump(out, f)
sys.exit(s.main([sys.argv[2], *sys.argv[4:], "--out", sys.argv[3] + ".cli.json",
                 "--score-thr", "0.2"]))
'''


def test_standalone_onnxruntime_only_equals_mmdet(setup, exported, tmp_path):
    """tools/onnx_detect_standalone.py with torch, mmdet, mmcv, mmengine and efficientvit_det
    unimportable: its own preprocessing (OpenCV + numpy) and the graph give mmdet's detections
    on image files of two sizes (two network input sizes)."""
    _, _, model, images = setup
    cfg_path = setup[0]
    onnx_file = exported[0]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    dets_json = tmp_path / 'dets.json'
    r = subprocess.run([PY, '-c', STANDALONE_RUNNER, TOOLS, str(onnx_file), str(dets_json),
                        *images], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(dets_json) as f:
        got = json.load(f)
    cfg = load_config(cfg_path)
    input_shapes = set()
    for image in images:
        inputs, _, expected = _expected(model, cfg, image)
        input_shapes.add(tuple(inputs.shape))
        assert len(expected.bboxes) > 20
        g = got[image]
        compare_detections(np.array(g['boxes']).reshape(-1, 4), np.array(g['scores']),
                           np.array(g['labels']), expected, REL_TOL, what=f'standalone {image}')
    assert len(input_shapes) == 2, input_shapes
    with open(str(dets_json) + '.cli.json') as f:
        cli = json.load(f)
    assert [e['image'] for e in cli] == images
    for e, image in zip(cli, images):
        h, w = cv2.imread(image).shape[:2]
        assert (e['height'], e['width']) == (h, w)
        n = sum(s >= 0.2 for s in got[image]['scores'])
        assert len(e['detections']) == n and n > 0
        assert {d['class'] for d in e['detections']} <= {f'c{i}' for i in range(6)}


def test_standalone_rejects_a_graph_without_preprocessing(setup, tmp_path):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['input'], ['out'])], 'g',
                              [helper.make_tensor_value_info('input', TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info('out', TensorProto.FLOAT, [1])])
    path = str(tmp_path / 'plain.onnx')
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), path)
    r = subprocess.run([PY, osp.join(TOOLS, 'onnx_detect_standalone.py'), path, setup[3][0]],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and '--end2end' in r.stderr, r.stderr
