"""RobustLoadImageFromFile: every awkward image either loads correctly or is skipped with a
warning naming the file and counted (skip mode), or raises ImageLoadError naming it
(fail-fast mode).  Also: the counter is shared by dataloader workers, the whole detector runs
on tiny and extreme-aspect images, and test-mode datasets refuse to drop images."""
from __future__ import annotations

import io
import json
import os

import cv2
import mmcv
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from efficientvit_det.datasets.coco_checks import SafeCocoDataset
from efficientvit_det.datasets.robust_loading import (
    ImageLoadError,
    RobustLoadImageFromFile,
    apply_exif_orientation,
    decode_image,
)
from efficientvit_det.registry import TRANSFORMS

RNG = np.random.default_rng(0)
BGR = (RNG.random((30, 50, 3)) * 255).astype(np.uint8)  # H=30, W=50


# -- helpers ----------------------------------------------------------------------------
def jpeg(img_bgr: np.ndarray, orientation: int = 1) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(img_bgr[..., ::-1]))
    bio = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(bio, 'JPEG', quality=95, exif=exif.tobytes())
    else:
        im.save(bio, 'JPEG', quality=95)
    return bio.getvalue()


def png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode('.png', arr)
    assert ok
    return buf.tobytes()


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def load(path, **kwargs):
    t = TRANSFORMS.build(dict(type='RobustLoadImageFromFile', **kwargs))
    return t, t(dict(img_path=str(path)))


# -- failures: skip (counted, named) or raise (named) -------------------------------------
BROKEN = {
    'truncated.jpg': lambda: jpeg(BGR)[:len(jpeg(BGR)) // 2],
    'no_eoi.jpg': lambda: jpeg(BGR)[:-2],
    'truncated.png': lambda: png(BGR)[:len(png(BGR)) // 2],
    'zero_byte.jpg': lambda: b'',
    'garbage.jpg': lambda: b'this is not an image' * 10,
    'header_only.png': lambda: png(BGR)[:40],
}


@pytest.mark.parametrize('name', sorted(BROKEN))
def test_broken_file_is_skipped_with_a_warning_naming_it_and_counted(name, tmp_path, log):
    path = write(tmp_path, name, BROKEN[name]())
    t, out = load(path)  # on_error='skip' is the default
    assert out is None
    assert t.num_skipped == 1
    assert path in log.text(), log.text()
    assert t.recorder.recent() and path in t.recorder.recent()[0]
    t(dict(img_path=path))
    assert t.num_skipped == 2  # every skip is counted (the warning is given once per file)


@pytest.mark.parametrize('name', sorted(BROKEN))
def test_broken_file_fail_fast_raises_naming_it(name, tmp_path):
    path = write(tmp_path, name, BROKEN[name]())
    with pytest.raises(ImageLoadError) as e:
        load(path, on_error='raise')
    assert path in str(e.value) and e.value.path == path
    if name == 'zero_byte.jpg':
        assert 'zero-byte' in str(e.value)
    if name.startswith('truncated'):
        assert 'truncated' in str(e.value) or 'corrupt' in str(e.value)


def test_missing_file_and_directory(tmp_path, log):
    t, out = load(tmp_path / 'nope.jpg')
    assert out is None and t.num_skipped == 1 and 'file not found' in log.text()
    with pytest.raises(ImageLoadError, match='file not found'):
        load(tmp_path / 'nope.jpg', on_error='raise')
    with pytest.raises(ImageLoadError, match=str(tmp_path)):
        load(tmp_path, on_error='raise')


def test_consecutive_failures_raise_instead_of_skipping_everything(tmp_path):
    t = RobustLoadImageFromFile(max_consecutive_errors=5)
    for i in range(4):
        assert t(dict(img_path=str(tmp_path / f'missing{i}.jpg'))) is None
    with pytest.raises(ImageLoadError, match='5 images in a row.*data_root'):
        t(dict(img_path=str(tmp_path / 'missing4.jpg')))
    # a success resets the streak
    good = write(tmp_path, 'good.png', png(BGR))
    t2 = RobustLoadImageFromFile(max_consecutive_errors=3)
    for i in range(10):
        assert t2(dict(img_path=str(tmp_path / f'm{i}.jpg'))) is None if i % 2 == 0 \
            else t2(dict(img_path=good)) is not None


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="on_error must be one of"):
        RobustLoadImageFromFile(on_error='ignore')
    with pytest.raises(ValueError, match='exif_orientation'):
        RobustLoadImageFromFile(exif_orientation='rotate')
    with pytest.raises(ValueError, match='alpha_background'):
        RobustLoadImageFromFile(alpha_background=(1, 2))


# -- decodable variants -------------------------------------------------------------------
def test_plain_color_matches_mmcv(tmp_path):
    for name, data in (('a.png', png(BGR)), ('a.jpg', jpeg(BGR))):
        path = write(tmp_path, name, data)
        _, out = load(path)
        ref = mmcv.imfrombytes(data, flag='color')
        assert out['img'].dtype == np.uint8 and np.array_equal(out['img'], ref)
        assert out['img_shape'] == out['ori_shape'] == (30, 50)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = BGR[..., 1]
    for name, data in (('g.png', png(gray)), ('g.jpg', jpeg(np.dstack([gray] * 3)))):
        path = write(tmp_path, name, data)
        _, out = load(path)
        img = out['img']
        assert img.shape == (30, 50, 3)
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    _, out = load(write(tmp_path, 'g2.png', png(gray)))
    assert np.array_equal(out['img'][..., 0], gray)
    _, out = load(write(tmp_path, 'g3.png', png(gray)), color_type='grayscale')
    assert out['img'].shape == (30, 50) and np.array_equal(out['img'], gray)


def test_rgba_drops_alpha_like_mmcv_or_composites(tmp_path):
    alpha = np.zeros((30, 50), np.uint8)
    alpha[:, 25:] = 255
    bgra = np.dstack([BGR, alpha])
    data = png(bgra)
    path = write(tmp_path, 'rgba.png', data)
    _, out = load(path)
    assert np.array_equal(out['img'], BGR)
    assert np.array_equal(out['img'], mmcv.imfrombytes(data, flag='color'))
    _, out = load(path, alpha_background=(255, 0, 0))  # onto red (RGB)
    assert np.array_equal(out['img'][:, 25:], BGR[:, 25:])  # opaque: unchanged
    assert (out['img'][:, :25] == np.array([0, 0, 255], np.uint8)).all()  # BGR red
    # gray + alpha (PNG 'LA') through the same path
    la = Image.fromarray(np.dstack([BGR[..., 0], alpha]), 'LA')
    bio = io.BytesIO()
    la.save(bio, 'PNG')
    _, out = load(write(tmp_path, 'la.png', bio.getvalue()))
    assert out['img'].shape == (30, 50, 3) and np.array_equal(out['img'][..., 2], BGR[..., 0])


def test_16bit_png_scaled_to_8bit(tmp_path):
    deep = (RNG.random((30, 50, 3)) * 65535).astype(np.uint16)
    path = write(tmp_path, 'deep.png', png(deep))
    _, out = load(path)
    expected = ((deep.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert out['img'].dtype == np.uint8 and np.array_equal(out['img'], expected)
    # 12-bit data in a 16-bit file: 'minmax' stretches it to the full 8-bit range
    twelve = (RNG.random((30, 50)) * 4095).astype(np.uint16)
    path = write(tmp_path, 'twelve.png', png(twelve))
    _, full = load(path)
    _, mm = load(path, uint16_scaling='minmax')
    assert full['img'].max() <= 16 and mm['img'].min() == 0 and mm['img'].max() == 255
    # a 16-bit gray image through Pillow's decoder gives the same as through OpenCV's
    im = Image.fromarray(twelve)
    bio = io.BytesIO()
    im.save(bio, 'PNG')
    _, pil_saved = load(write(tmp_path, 'twelve_pil.png', bio.getvalue()))
    assert np.array_equal(pil_saved['img'], full['img'])


def test_pillow_fallback_for_formats_opencv_lacks(tmp_path):
    bio = io.BytesIO()
    Image.fromarray(BGR[..., ::-1]).convert('P').save(bio, 'GIF')
    _, out = load(write(tmp_path, 'a.gif', bio.getvalue()))
    assert out['img'].shape == (30, 50, 3) and out['img'].dtype == np.uint8


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_matches_pillow_and_opencv(orientation, tmp_path):
    data = jpeg(BGR, orientation)
    img, info = decode_image(data, 'x.jpg')
    upright = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))[..., ::-1]
    assert np.array_equal(img, upright)
    assert np.array_equal(img, mmcv.imfrombytes(data, flag='color'))  # mmdet's default loader
    assert info['orientation'] == orientation
    stored, _ = decode_image(data, 'x.jpg', exif_orientation='ignore')
    assert stored.shape == (30, 50, 3)
    assert np.array_equal(apply_exif_orientation(stored, orientation), img)


def test_exif_auto_follows_the_annotation_frame(tmp_path, log):
    path = write(tmp_path, 'rot.jpg', jpeg(BGR, 6))  # stored 50x30, upright 30x50 (WxH)
    # record in the upright frame (what viewers and most tools show): tag applied
    out = RobustLoadImageFromFile()(dict(img_path=path, height=50, width=30))
    assert out['img'].shape[:2] == (50, 30)
    # record in the stored frame: the annotations were drawn on the stored pixels
    t = RobustLoadImageFromFile()
    out = t(dict(img_path=path, height=30, width=50))
    assert out['img'].shape[:2] == (30, 50) and t.num_skipped == 0
    assert 'EXIF orientation 6 ignored' in log.text() and path in log.text()
    # forced modes
    t = RobustLoadImageFromFile(exif_orientation='apply')
    assert t(dict(img_path=path, height=30, width=50)) is None  # size mismatch: skipped
    assert t.num_skipped == 1 and "exif_orientation='ignore'" in log.text()
    with pytest.raises(ImageLoadError, match="exif_orientation='ignore'"):
        RobustLoadImageFromFile(exif_orientation='apply', on_error='raise')(
            dict(img_path=path, height=30, width=50))
    out = RobustLoadImageFromFile(exif_orientation='ignore')(dict(img_path=path))
    assert out['img'].shape[:2] == (30, 50)


def test_size_mismatch_with_the_record(tmp_path):
    path = write(tmp_path, 'a.png', png(BGR))
    with pytest.raises(ImageLoadError, match='does not match the annotation record'):
        RobustLoadImageFromFile(on_error='raise')(dict(img_path=path, height=31, width=50))
    out = RobustLoadImageFromFile(check_size=False)(dict(img_path=path, height=31, width=50))
    assert out['img'].shape[:2] == (30, 50)


@pytest.mark.parametrize('hw', [(20, 20), (100, 4000), (4000, 100), (1, 1), (1, 300)])
def test_tiny_and_extreme_aspect_images_load(hw, tmp_path):
    img = (RNG.random((*hw, 3)) * 255).astype(np.uint8)
    _, out = load(write(tmp_path, f'{hw[0]}x{hw[1]}.png', png(img)))
    assert np.array_equal(out['img'], img)


def _detector():
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    import efficientvit_det.models  # noqa: F401
    from efficientvit_det.archs import ARCH_SETTINGS
    dims = list(ARCH_SETTINGS['m0']['embed_dims'])
    cfg = dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=dict(type='EfficientViT', arch='m0', out_indices=(2, 3, 4),
                      attn_backend='module'),
        neck=dict(type='EfficientViTFPN', in_channels=dims, out_channels=32, start_level=0,
                  num_outs=5, num_extra_trans_convs=1, add_extra_convs='on_input'),
        bbox_head=dict(
            type='RetinaHead', num_classes=2, in_channels=32, stacked_convs=1, feat_channels=32,
            anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                  scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                  strides=[8, 16, 32, 64, 128]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4,
                            target_stds=[1.0] * 4),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                          loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4,
                                     min_pos_iou=0, ignore_iof_thr=-1),
                       sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1,
                       debug=False),
        test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.0,
                      nms=dict(type='nms', iou_threshold=0.5), max_per_img=10))
    model = MODELS.build(ConfigDict(cfg))  # heads read test_cfg attributes
    model.init_weights()
    return model


@pytest.mark.parametrize('hw,scale', [((20, 20), (20, 20)), ((100, 4000), (1333, 800))])
def test_detector_trains_and_predicts_on_tiny_and_extreme_images(hw, scale, tmp_path):
    """20x20 at its own scale (padded to 32x32: every backbone map is smaller than a 7x7
    window, the stride-64 map is 1x1) and 4000x100 resized like COCO (1333x33) through the
    mmdet pipeline and RetinaNet + EfficientViT-M0 + EfficientViTFPN: finite losses and
    gradients, predictions inside the original image."""
    from mmcv.transforms import Compose
    h, w = hw
    resize = [dict(type='Resize', scale=scale, keep_ratio=True)]
    img = (RNG.random((h, w, 3)) * 255).astype(np.uint8)
    path = write(tmp_path, 'img.png', png(img))
    box = [w * 0.2, h * 0.2, w * 0.7, h * 0.8]
    pipeline = Compose([
        dict(type='RobustLoadImageFromFile', on_error='raise'),
        dict(type='LoadAnnotations', with_bbox=True),
        *resize,
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs')])
    info = dict(img_path=path, img_id=0, height=h, width=w,
                instances=[dict(bbox=box, bbox_label=1, ignore_flag=0)])
    # the lone ground-truth box covers most of the image (no empty-target corner case)
    data = pipeline(dict(info))
    assert data is not None
    torch.manual_seed(0)
    model = _detector()
    model.train()
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), training=True)
    losses = model(**batch, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    test_pipeline = Compose([
        dict(type='RobustLoadImageFromFile', on_error='raise'),
        *resize,
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                             'scale_factor'))])
    data = test_pipeline(dict(img_path=path, img_id=0, height=h, width=w))
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                             data_samples=[data['data_samples']]))
        pred = model(**batch, mode='predict')[0].pred_instances
    assert len(pred) > 0 and torch.isfinite(pred.bboxes).all()
    assert (pred.bboxes[:, 2] <= w + 1e-3).all() and (pred.bboxes[:, 3] <= h + 1e-3).all()


# -- through the dataset and the dataloader workers ---------------------------------------
def _coco_set(tmp_path, n_good=6, broken=('bad0.jpg', 'bad1.png')):
    images, anns = [], []
    (tmp_path / 'img').mkdir(exist_ok=True)
    names = [f'good{i}.png' for i in range(n_good)] + list(broken)
    for i, name in enumerate(names):
        if name.startswith('good'):
            (tmp_path / 'img' / name).write_bytes(png(BGR))
        else:
            (tmp_path / 'img' / name).write_bytes(BROKEN['truncated.jpg']())
        images.append(dict(id=i, file_name=name, width=50, height=30))
        anns.append(dict(id=i + 1, image_id=i, category_id=1, bbox=[5, 5, 20, 10], area=200,
                         iscrowd=0))
    ann_file = tmp_path / 'ann.json'
    ann_file.write_text(json.dumps(dict(images=images, annotations=anns,
                                        categories=[dict(id=1, name='thing')])))
    return str(ann_file), names


def _dataset(tmp_path, test_mode=False, on_error='skip', **kw):
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')  # as the Runner does with default_scope='mmdet'
    ann_file, names = _coco_set(tmp_path, **kw)
    pipeline = [dict(type='RobustLoadImageFromFile', on_error=on_error),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='PackDetInputs')]
    ds = SafeCocoDataset(ann_file=ann_file, data_prefix=dict(img=str(tmp_path / 'img') + '/'),
                         metainfo=dict(classes=('thing',)), pipeline=pipeline,
                         test_mode=test_mode)
    return ds, names


def test_dataset_replaces_skipped_images_and_counts_them(tmp_path, log):
    """mmengine's BaseDataset.__getitem__ draws another index when the pipeline returns
    None (training mode); the skip is counted and the file named."""
    ds, names = _dataset(tmp_path)
    loader = ds.pipeline.transforms[0]
    bad = [i for i in range(len(ds)) if 'bad' in ds.get_data_info(i)['img_path']]
    assert len(bad) == 2
    np.random.seed(0)
    for i in bad:
        sample = ds[i]
        assert 'good' in sample['data_samples'].img_path
    assert loader.num_skipped >= 2  # a redraw may hit a bad file again: counted again
    assert 'bad0.jpg' in log.text() and 'bad1.png' in log.text()


def test_counter_is_shared_by_dataloader_workers(tmp_path):
    from mmengine.dataset import pseudo_collate
    ds, _ = _dataset(tmp_path)
    loader = ds.pipeline.transforms[0]
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=pseudo_collate,
                                     multiprocessing_context='fork')
    seen = sum(len(b['inputs']) for b in dl)
    assert seen == len(ds)
    assert loader.num_skipped >= 2  # counted in the workers, read in this process
    names = ' '.join(loader.recorder.recent())
    assert 'bad0.jpg' in names and 'bad1.png' in names


def test_test_mode_dataset_names_the_image_it_cannot_drop(tmp_path):
    ds, _ = _dataset(tmp_path, test_mode=True)
    bad = next(i for i in range(len(ds)) if 'bad' in ds.get_data_info(i)['img_path'])
    with pytest.raises(ImageLoadError, match='bad0.jpg.*evaluation needs every image'):
        ds[bad]
    ds, _ = _dataset(tmp_path, test_mode=True, on_error='raise')
    with pytest.raises(ImageLoadError, match='bad0.jpg'):
        ds[bad]


def test_deepcopy_and_pickle_keep_working(tmp_path):
    import copy
    import pickle
    t = RobustLoadImageFromFile()
    t(dict(img_path=str(tmp_path / 'missing.jpg')))
    c = copy.deepcopy(t)
    c(dict(img_path=str(tmp_path / 'missing2.jpg')))
    assert t.num_skipped == 2  # copies share the counter
    p = pickle.loads(pickle.dumps(t))  # outside spawning: a private snapshot
    assert p.num_skipped == 2
    p(dict(img_path=str(tmp_path / 'missing3.jpg')))
    assert p.num_skipped == 3 and t.num_skipped == 2
    assert os.path.basename('missing3.jpg') in ' '.join(p.recorder.recent())
