"""Property tests (hypothesis, derandomized so CI is reproducible):

* the EfficientViT backbone (m0, reference attention, eval) on any input size from 1x1 to
  96x96 runs and returns the five levels with ceil-halved sizes (each stride-2 conv maps
  n -> (n - 1) // 2 + 1) and the documented channels, all finite;
* the image loader on valid images of random size, depth, channels and format decodes them
  to the right shape;
* the image loader on randomly corrupted bytes raises nothing but ImageLoadError in
  fail-fast mode, and never raises (returns a valid image or None, counted) in skip mode.
"""
from __future__ import annotations

import io
import os
import tempfile

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from efficientvit_det.archs import ARCH_SETTINGS
from efficientvit_det.datasets.robust_loading import ImageLoadError, RobustLoadImageFromFile
from efficientvit_det.models.backbones.efficientvit import EfficientViT

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])


# -- backbone ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def m0():
    torch.manual_seed(0)
    model = EfficientViT('m0', out_indices=(0, 1, 2, 3, 4), attn_backend='module').eval()
    return model


def halve(n: int, times: int) -> int:
    for _ in range(times):
        n = (n - 1) // 2 + 1
    return n


@settings(max_examples=30, **SETTINGS)
@given(h=st.integers(1, 96), w=st.integers(1, 96), batch=st.integers(1, 2))
def test_backbone_any_size_right_shapes(m0, h, w, batch):
    dims = ARCH_SETTINGS['m0']['embed_dims']
    channels = (dims[0] // 4, dims[0] // 2, *dims)
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        outs = m0(x)
    assert len(outs) == 5
    for level, (out, c) in enumerate(zip(outs, channels)):
        k = level + 2  # stride 4 = two stride-2 convs, ..., stride 64 = six
        assert tuple(out.shape) == (batch, c, halve(h, k), halve(w, k)), (level, h, w)
        assert torch.isfinite(out).all()
    assert m0.out_channels == list(channels)


# -- image loader: valid images ------------------------------------------------------------
def encode(arr: np.ndarray, fmt: str) -> bytes:
    if fmt in ('png', 'bmp', 'tiff', 'jpg'):
        ok, buf = cv2.imencode('.' + fmt, arr)
        assert ok
        return buf.tobytes()
    im = Image.fromarray(arr if arr.ndim == 2 else arr[..., ::-1].copy())
    bio = io.BytesIO()
    im.save(bio, 'GIF')
    return bio.getvalue()


@st.composite
def valid_images(draw):
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    fmt = draw(st.sampled_from(['png', 'jpg', 'bmp', 'tiff', 'gif']))
    channels = draw(st.sampled_from([1, 3] + ([4] if fmt in ('png', 'tiff') else [])))
    deep = fmt in ('png', 'tiff') and draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    if deep:
        arr = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    else:
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if fmt == 'gif':
        arr = arr if channels == 1 else arr[..., :3]
    return encode(arr, fmt), (h, w), fmt


@settings(max_examples=60, **SETTINGS)
@given(case=valid_images(), color=st.sampled_from(['color', 'grayscale']))
def test_loader_decodes_valid_images(case, color):
    data, (h, w), fmt = case
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f'img.{fmt}')
        with open(path, 'wb') as f:
            f.write(data)
        t = RobustLoadImageFromFile(on_error='raise', color_type=color)
        out = t(dict(img_path=path, height=h, width=w))
    img = out['img']
    assert img.dtype == np.uint8
    assert img.shape == ((h, w, 3) if color == 'color' else (h, w))
    assert out['img_shape'] == out['ori_shape'] == (h, w)


# -- image loader: corrupted bytes -------------------------------------------------------
def _seeds():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, size=(20, 20), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    bio = io.BytesIO()
    Image.fromarray(small).save(bio, 'JPEG', exif=exif.tobytes())
    return [encode(small, 'png'), encode(small, 'jpg'), encode(deep, 'png'),
            encode(small, 'bmp'), encode(small, 'tiff'), encode(small, 'gif'), bio.getvalue()]


SEEDS = _seeds()


@st.composite
def corrupted(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    kinds = ['flip'] * 4 + ['truncate', 'insert', 'delete', 'zero_tail']  # mostly flips
    ops = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4))
    for op in ops:
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == 'truncate':
            del data[pos:]
        elif op == 'flip':
            for p in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
                data[p] = draw(st.integers(0, 255))
        elif op == 'insert':
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == 'delete':
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            data[pos:] = bytes(len(data) - pos)
    return bytes(data)


@settings(max_examples=150, **SETTINGS)
@given(data=st.one_of(corrupted(), corrupted(), st.binary(max_size=256)),
       record=st.sampled_from([None, (24, 32), (32, 24)]))
def test_loader_on_corrupted_bytes(data, record):
    info = {} if record is None else dict(height=record[0], width=record[1])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'corrupt.img')
        with open(path, 'wb') as f:
            f.write(data)
        # fail-fast: a valid image, or ImageLoadError naming the file -- nothing else
        try:
            out = RobustLoadImageFromFile(on_error='raise')(dict(img_path=path, **info))
        except ImageLoadError as e:
            assert path in str(e)
            failed = True
            event(f'failed: {e.reason.split(" (")[0][:40]}')
        else:
            failed = False
            event('decoded')
            img = out['img']
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            assert min(img.shape[:2]) >= 1
            if record is not None:
                assert img.shape[:2] == record
        # skip mode: never raises; None exactly when fail-fast failed, and then counted
        t = RobustLoadImageFromFile(on_error='skip')
        out = t(dict(img_path=path, **info))
        assert (out is None) == failed
        assert t.num_skipped == int(failed)
