"""Test-time augmentation (``tools/test.py --tta``) for RetinaNet and Mask R-CNN.

The COCO configs ship ``tta_model`` / ``tta_pipeline`` (two scales x horizontal flip); the
tests run exactly those settings through tools/test.py on tiny synthetic data (only the two
scales shrunk to the 128 px images, and the tiny CI models), and check the merge of
``DetTTAModelWithMasks`` against hand-made views.
"""
import copy
import os.path as osp
import pickle
import re
import sys

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.structures import InstanceData

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import _workflow_common as wf  # noqa: E402

SHIPPED = {
    'retinanet': osp.join(wf.ROOT, 'configs', 'retinanet_efficientvit_m4_coco.py'),
    'mask_rcnn': osp.join(wf.ROOT, 'configs', 'mask_rcnn_efficientvit_m4_coco.py'),
}
TINY_SCALES = [(128, 128), (160, 160)]
NUM_VAL = 3


def test_shipped_tta_is_two_scales_times_flip():
    for kind, path in SHIPPED.items():
        cfg = Config.fromfile(path)
        assert cfg.tta_model.type == ('DetTTAModel' if kind == 'retinanet'
                                      else 'DetTTAModelWithMasks')
        aug = cfg.tta_pipeline[1]
        assert aug.type == 'TestTimeAug'
        resizes, flips = aug.transforms[0], aug.transforms[1]
        assert [r.type for r in resizes] == ['Resize', 'Resize']
        assert len({tuple(r.scale) for r in resizes}) == 2
        assert sorted(f.prob for f in flips) == [0., 1.]
        assert {'flip', 'flip_direction'} <= set(aug.transforms[-1][0].meta_keys)


def tta_config(kind, tiny_path, out_path):
    """The tiny config with the shipped COCO config's tta_model / tta_pipeline, scales shrunk."""
    shipped = Config.fromfile(SHIPPED[kind])
    cfg = Config.fromfile(tiny_path)
    pipeline = copy.deepcopy(shipped.tta_pipeline)
    for resize, scale in zip(pipeline[1].transforms[0], TINY_SCALES):
        resize.scale = scale
    cfg.tta_model = copy.deepcopy(shipped.tta_model)
    cfg.tta_pipeline = pipeline
    cfg.dump(str(out_path))
    return str(out_path)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return wf.make_dataset(tmp_path_factory.mktemp('tta') / 'data', num_train=0,
                           num_val=NUM_VAL, size=128, seed=5)


@pytest.mark.parametrize('kind', ['retinanet', 'mask_rcnn'])
def test_test_tool_tta_runs_and_returns_detections(kind, data, tmp_path):
    from mmdet.registry import MODELS

    import efficientvit_det  # noqa: F401

    writer = wf.write_tiny_config if kind == 'retinanet' else wf.write_tiny_mask_rcnn_config
    tiny = writer(tmp_path / 'tiny.py', data, size=128)
    cfg = tta_config(kind, tiny, tmp_path / 'tta.py')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(cfg).model)
    model.init_weights()  # untrained: with every box kept there are detections to merge
    ckpt = tmp_path / 'init.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    score = 'model.test_cfg.score_thr=0.0' if kind == 'retinanet' \
        else 'model.test_cfg.rcnn.score_thr=0.0'
    out = tmp_path / 'preds.pkl'
    r = wf.run([wf.PY, osp.join(wf.TOOLS, 'test.py'), cfg, ckpt, '--tta', '--out', out,
                '--work-dir', tmp_path / 'work', '--cfg-options', score])
    text = r.stdout + r.stderr
    for metric in (['bbox'] if kind == 'retinanet' else ['bbox', 'segm']):
        assert re.search(rf'coco/{metric}_mAP: [\d.]+', text), text[-3000:]
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == NUM_VAL
    for pred in preds:
        inst = pred['pred_instances']
        n = len(inst['scores'])
        assert 0 < n <= 100  # merged views, capped by tta_cfg.max_per_img
        boxes = inst['bboxes']
        assert (boxes[:, 0] >= -1).all() and (boxes[:, 2] <= 129).all()  # original image
        assert (inst['scores'][:-1] >= inst['scores'][1:]).all()  # sorted by the merge's NMS
        if kind == 'mask_rcnn':
            assert len(inst['masks']) == n and list(inst['masks'][0]['size']) == [128, 128]


# --------------------------------------------------------------------------------------------
# the mask merge against hand-made views
# --------------------------------------------------------------------------------------------
TTA_CFG = ConfigDict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)


class _Detector(torch.nn.Module):
    """Stands in for the wrapped detector: only the merge is exercised."""

    def test_step(self, data):
        raise NotImplementedError


def _view(boxes, scores, masks, flip):
    from mmdet.structures import DetDataSample
    sample = DetDataSample(metainfo=dict(ori_shape=(8, 10), flip=flip,
                                         flip_direction='horizontal' if flip else None))
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor(boxes, dtype=torch.float32),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.zeros(len(scores), dtype=torch.long), masks=torch.stack(masks))
    return sample


def test_mask_merge_keeps_each_surviving_box_with_its_own_view_mask():
    from efficientvit_det.models.tta import DetTTAModelWithMasks

    left = torch.zeros(8, 10, dtype=torch.bool)
    left[2:6, 1:4] = True  # object at x 1..4 in the original image
    right = torch.zeros(8, 10, dtype=torch.bool)
    right[1:3, 7:10] = True  # another object at x 7..10
    # view 1 (flipped): predicts the left object, better scored, in flipped coordinates
    flipped_view = _view([[6., 2., 9., 6.]], [0.9], [left.flip(-1)], flip=True)
    # view 2 (as is): the left object again (lower score, slightly different) and the right one
    plain_left = torch.zeros_like(left)
    plain_left[2:7, 1:4] = True
    plain_view = _view([[1., 2., 4., 7.], [7., 1., 10., 3.]], [0.6, 0.8], [plain_left, right],
                       flip=False)
    tta = DetTTAModelWithMasks(module=_Detector(), tta_cfg=TTA_CFG)
    merged = tta.merge_preds([[flipped_view, plain_view]])[0].pred_instances
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8])
    assert merged.bboxes.tolist() == [[1., 2., 4., 6.], [7., 1., 10., 3.]]  # flipped back
    assert torch.equal(merged.masks[0], left)  # the winning (flipped) view's mask, flipped back
    assert torch.equal(merged.masks[1], right)


def test_mask_merge_of_box_only_views_is_mmdets():
    from mmdet.models.test_time_augs import DetTTAModel

    from efficientvit_det.models.tta import DetTTAModelWithMasks

    def views():
        a = _view([[1., 1., 4., 4.]], [0.7], [torch.zeros(8, 10, dtype=torch.bool)], True)
        b = _view([[5., 1., 8., 4.]], [0.6], [torch.zeros(8, 10, dtype=torch.bool)], False)
        for v in (a, b):
            del v.pred_instances.masks
        return [[a, b]]

    ours = DetTTAModelWithMasks(module=_Detector(), tta_cfg=TTA_CFG)
    theirs = DetTTAModel(module=_Detector(), tta_cfg=TTA_CFG)
    a = ours.merge_preds(views())[0].pred_instances
    b = theirs.merge_preds(views())[0].pred_instances
    assert torch.equal(a.bboxes, b.bboxes) and torch.equal(a.scores, b.scores)
