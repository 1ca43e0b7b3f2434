"""``RobustLoadImageFromFile``: an image loader that decodes what real datasets contain and
skips (counted, named in the log) or refuses (fail-fast) what cannot be decoded.

Policy (see ``docs/robustness.md``)
-----------------------------------
Decoded, always to an 8-bit BGR image (or 8-bit grayscale with ``color_type='grayscale'``):

* grayscale (1 channel) -> the gray value in all three channels;
* gray + alpha, RGBA -> the alpha channel is dropped (what mmcv's ``LoadImageFromFile``
  does), or, with ``alpha_background=(R, G, B)``, the image is composited onto that colour;
* 16-bit (PNG, TIFF) -> linear full-range scaling ``v * 255 / 65535`` (``'full'``, the
  default), or a per-image min-max stretch (``uint16_scaling='minmax'``, for 12-bit or
  depth-like data that uses a small part of the range); float images are taken as [0, 1]
  if their maximum is <= 1, else clipped to [0, 255];
* EXIF orientation (JPEG, PNG ``eXIf``, TIFF, WebP): ``exif_orientation='auto'`` (default)
  applies the tag, like OpenCV's ``imread``, mmcv's ``LoadImageFromFile`` and image
  viewers -- the frame most annotation tools show -- *unless* the annotation record's
  ``width``/``height`` match the stored (un-rotated) pixels and not the rotated ones: then
  the annotations were evidently drawn on the stored pixels and the tag is ignored for that
  file (logged).  ``'apply'`` / ``'ignore'`` force one frame for every file;
* any size from 1x1 and any aspect ratio (the backbone pads every map to its 7x7 windows).

Failures: missing, unreadable, zero-byte, truncated (a JPEG without its end-of-image
marker counts as truncated) or undecodable files, unsupported channel counts, and -- with
``check_size=True`` -- an image whose decoded size disagrees with its annotation record
(boxes would be in another frame).  With ``on_error='skip'`` (default, for training) the
transform logs a warning naming the file and the reason, counts it in a counter shared by
all dataloader workers (:class:`SkippedImagesHook` writes it to the training log) and
returns ``None``: mmengine's ``BaseDataset.__getitem__`` then draws another index (up to
``max_refetch`` times).  ``max_consecutive_errors`` failures in a row (a wrong
``data_root`` / ``data_prefix``, an unmounted disk) raise instead of silently skipping the
whole dataset.  With ``on_error='raise'`` (fail-fast; use it in val/test pipelines, where
every image must be evaluated) the first failure raises :class:`ImageLoadError` naming the
file; nothing else escapes the transform for a bad file.
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import warnings
from multiprocessing.context import get_spawning_popen
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from mmcv.transforms import BaseTransform
from mmengine import fileio
from mmengine.logging import print_log

from efficientvit_det.registry import TRANSFORMS

__all__ = ['ImageLoadError', 'RobustLoadImageFromFile', 'SkipRecorder', 'decode_image',
           'read_exif_orientation', 'apply_exif_orientation']

ON_ERROR = ('skip', 'raise')
EXIF_MODES = ('auto', 'apply', 'ignore')
UINT16_SCALINGS = ('full', 'minmax')
COLOR_TYPES = ('color', 'grayscale')
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height


class ImageLoadError(RuntimeError):
    """An image file that cannot be used; the message names the file and the reason.

    Takes a single message argument so that torch's DataLoader can re-raise it from a
    worker process; ``path`` and ``reason`` are kept as attributes when known.
    """

    def __init__(self, message: str, path: Optional[str] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.path = path
        self.reason = reason


def _error(path: str, reason: str) -> ImageLoadError:
    return ImageLoadError(f'cannot load image {path}: {reason}', path=path, reason=reason)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------
def read_exif_orientation(buf: bytes) -> int:
    """The EXIF orientation tag (1..8) of an encoded image; 1 when absent or unreadable."""
    # Cheap pre-checks: Pillow decodes a whole PNG to find an eXIf chunk placed after the
    # pixel data, so only ask it when the file can contain EXIF at all.
    if buf[:8] == b'\x89PNG\r\n\x1a\n':
        if b'eXIf' not in buf:
            return 1
    elif buf[:2] == b'\xff\xd8':  # JPEG: EXIF lives in an APP1 segment near the start
        if b'Exif\x00\x00' not in buf[:131072]:
            return 1
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "Corrupt EXIF data" and the like
            with Image.open(io.BytesIO(buf)) as im:
                value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make a decodable image fail
        return 1
    return value if 1 <= value <= 8 else 1


def apply_exif_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (H x W [x C]) upright according to an EXIF orientation value."""
    if orientation == 2:
        out = img[:, ::-1]
    elif orientation == 3:
        out = img[::-1, ::-1]
    elif orientation == 4:
        out = img[::-1]
    elif orientation == 5:  # transpose
        out = img.swapaxes(0, 1)
    elif orientation == 6:  # rotate 90 degrees clockwise
        out = img.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:  # transverse
        out = img.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:  # rotate 90 degrees counter-clockwise
        out = img.swapaxes(0, 1)[::-1]
    else:
        return img
    return np.ascontiguousarray(out)


def _decode_with_pillow(buf: bytes) -> np.ndarray:
    """Stored pixels via Pillow (GIF and other formats OpenCV lacks), channels as OpenCV's."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # damaged metadata; the pixels decide
        im = Image.open(io.BytesIO(buf))
        im.load()  # strict: Pillow refuses truncated files (LOAD_TRUNCATED_IMAGES is off)
    with im:
        mode = im.mode
        if mode in ('P', 'PA'):
            im = im.convert('RGBA' if mode == 'PA' or 'transparency' in im.info else 'RGB')
        elif mode == '1':
            im = im.convert('L')
        elif mode in ('La', 'RGBa'):
            im = im.convert('LA' if mode == 'La' else 'RGBA')
        elif mode not in ('L', 'LA', 'RGB', 'RGBA', 'I', 'F') and not mode.startswith('I;16'):
            im = im.convert('RGB')  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        arr = np.array(im)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):  # RGB(A) -> BGR(A), as OpenCV returns
        arr = np.ascontiguousarray(arr[..., [2, 1, 0, 3][:arr.shape[2]]])
    return arr


def _to_uint8(img: np.ndarray, uint16_scaling: str) -> np.ndarray:
    """Any pixel depth to uint8 (see the module docstring for the policy)."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    if np.issubdtype(img.dtype, np.floating):
        f = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if not np.issubdtype(img.dtype, np.integer):
        raise ValueError(f'unsupported pixel type {img.dtype}')
    a = np.clip(img.astype(np.int64), 0, None)
    hi = int(a.max()) if a.size else 0
    if uint16_scaling == 'minmax':
        lo = int(a.min()) if a.size else 0
        if hi == lo:
            return np.zeros(a.shape, np.uint8) if hi == 0 else np.full(a.shape, 255, np.uint8)
        return (((a - lo) * 255 + (hi - lo) // 2) // (hi - lo)).astype(np.uint8)
    if img.dtype == np.uint16 or hi > 255:
        full = 65535 if hi <= 65535 else hi  # 16-bit data (also in Pillow's int32 'I' mode)
        return ((a * 255 + full // 2) // full).astype(np.uint8)
    return a.astype(np.uint8)  # other integer types holding 8-bit values


DEFAULT_MAX_PIXELS = 1 << 28  # 268M pixels (16384 x 16384), 805 MB as 8-bit BGR


def _header_size(buf: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the file header, without decoding; None if Pillow cannot tell."""
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # DecompressionBombWarning: we check ourselves
            with Image.open(io.BytesIO(buf)) as im:
                return tuple(im.size)
    except Exception:
        return None


def _check_encoded(buf, path: str, max_pixels: int) -> bytes:
    """Refuse what is not encoded image data before any decoder sees it."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise _error(path, f'expected encoded bytes, got {type(buf).__name__}')
    buf = bytes(buf)
    if len(buf) == 0:
        raise _error(path, 'zero-byte file')
    # A damaged header can claim a huge image: refuse before a decoder allocates it.
    size = _header_size(buf)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _error(path, f'the header claims {size[0]}x{size[1]} pixels, more than '
                     f'max_pixels={max_pixels} (a damaged header, or raise max_pixels)')
    return buf


def _decode_stored_pixels(buf: bytes, path: str, max_pixels: int) -> np.ndarray:
    """The stored pixels (no EXIF rotation) at their own depth and channels: OpenCV, then
    Pillow for what OpenCV cannot decode; errors name both decoders' reasons."""
    raw = None
    cv_reason = 'not decodable'
    try:
        # IMREAD_UNCHANGED keeps depth, channels and alpha and ignores the EXIF
        # orientation: the orientation decision is ours (_exif_decision).
        raw = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception as e:  # pragma: no cover - OpenCV returns None for most bad data
        cv_reason = str(e).strip().splitlines()[-1]
    if raw is None:
        try:
            raw = _decode_with_pillow(buf)
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
            kind = 'truncated or corrupt' if 'truncated' in str(e) else 'corrupt or not an image'
            raise _error(path, f'{kind} (OpenCV: {cv_reason}; Pillow: '
                         f'{type(e).__name__}: {e})') from None
    if raw.ndim not in (2, 3) or raw.shape[0] == 0 or raw.shape[1] == 0 \
            or raw.shape[0] * raw.shape[1] > max_pixels:
        raise _error(path, f'decoded to an array of shape {raw.shape}')
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    if channels not in (1, 2, 3, 4):
        raise _error(path, f'{channels}-channel image is not supported (1 to 4 channels)')
    return raw


def _upright_hw(stored_hw: Tuple[int, int], orientation: int) -> Tuple[int, int]:
    return stored_hw[::-1] if orientation in _SWAPS_AXES else stored_hw


def _exif_decision(mode: str, orientation: int, stored_hw: Tuple[int, int],
                   expected_hw: Optional[Tuple[int, int]]) -> Tuple[bool, bool]:
    """``(apply, ignored_for_annotations)`` for the EXIF tag (module docstring): ``'auto'``
    applies it unless the annotation record has the stored, un-rotated size."""
    if mode == 'ignore':
        return False, False
    if mode == 'apply':
        return True, False
    if expected_hw is not None and orientation in _SWAPS_AXES \
            and tuple(expected_hw) == stored_hw \
            and tuple(expected_hw) != _upright_hw(stored_hw, orientation):
        return False, True
    return True, False


def _check_decoded_size(img: np.ndarray, expected_hw: Tuple[int, int], orientation: int,
                        stored_hw: Tuple[int, int], applied: bool, path: str) -> None:
    """Boxes drawn on another frame than the decoded one would be wrong: refuse, and say
    which ``exif_orientation`` gives the record's frame when one does."""
    if tuple(img.shape[:2]) == tuple(expected_hw):
        return
    h, w = img.shape[:2]
    hint = ''
    if orientation != 1 and tuple(expected_hw) in (stored_hw, _upright_hw(stored_hw, orientation)):
        hint = (f'; the file has EXIF orientation {orientation}: set exif_orientation='
                f"'{'ignore' if applied else 'apply'}' if the annotations are in that frame")
    raise _error(path, f'decoded size {w}x{h} (WxH) does not match the annotation record '
                 f'{expected_hw[1]}x{expected_hw[0]}: its boxes would be in another frame'
                 f'{hint} (check_size=False disables this check)')


def _split_to_uint8(img: np.ndarray, uint16_scaling: str,
                    path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(color or gray, alpha or None)``, both uint8; gray is returned as H x W."""
    alpha = None
    if img.ndim == 3 and img.shape[2] in (2, 4):  # gray + alpha or BGRA
        img, alpha = img[..., :-1], img[..., -1]
    try:
        img = _to_uint8(img, uint16_scaling)
        if alpha is not None:  # alpha is a coverage fraction: always full-range
            alpha = _to_uint8(alpha, 'full')
    except ValueError as e:
        raise _error(path, str(e)) from None
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    return img, alpha


def _composite(img: np.ndarray, alpha: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """Blend a uint8 gray or BGR image onto an ``(R, G, B)`` background; returns BGR."""
    bg = np.asarray(background, np.float32)[::-1]  # (R, G, B) -> BGR
    color = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(np.rint(color * a + bg * (1.0 - a)), 0, 255).astype(np.uint8)


def _to_color_type(img: np.ndarray, color_type: str) -> np.ndarray:
    """3-channel BGR for ``'color'``, H x W for ``'grayscale'``; always contiguous."""
    if color_type == 'grayscale':
        if img.ndim == 3:
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)
    elif img.ndim == 2:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img)


def decode_image(buf: bytes, path: str = '<bytes>', *, exif_orientation: str = 'auto',
                 expected_hw: Optional[Tuple[int, int]] = None, check_size: bool = True,
                 uint16_scaling: str = 'full',
                 alpha_background: Optional[Sequence[int]] = None,
                 color_type: str = 'color',
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, dict]:
    """Decode encoded image bytes to uint8 BGR (H x W x 3) or grayscale (H x W).

    Returns ``(img, info)`` with ``info`` = ``dict(orientation=int, exif_applied=bool,
    exif_ignored_for_annotations=bool)``.  Raises :class:`ImageLoadError` (and nothing
    else) for data that cannot be used.
    """
    buf = _check_encoded(buf, path, max_pixels)
    raw = _decode_stored_pixels(buf, path, max_pixels)
    orientation = read_exif_orientation(buf)
    stored_hw = tuple(raw.shape[:2])
    apply, ignored_for_annotations = _exif_decision(exif_orientation, orientation, stored_hw,
                                                    expected_hw)
    img = apply_exif_orientation(raw, orientation) if apply else raw
    if check_size and expected_hw is not None:
        _check_decoded_size(img, expected_hw, orientation, stored_hw, apply, path)
    img, alpha = _split_to_uint8(img, uint16_scaling, path)
    if alpha is not None and alpha_background is not None:
        img = _composite(img, alpha, alpha_background)
    img = _to_color_type(img, color_type)
    return img, dict(orientation=orientation, exif_applied=apply and orientation != 1,
                     exif_ignored_for_annotations=ignored_for_annotations)


# --------------------------------------------------------------------------------------
# Counting skipped files across dataloader workers
# --------------------------------------------------------------------------------------
class SkipRecorder:
    """A count of skipped files, plus the last few names, shared by all worker processes.

    Lives in shared memory created in the main process when the dataset is built, so that
    dataloader workers (forked, or spawned: the dataset is pickled while spawning) add to
    the counters that :class:`SkippedImagesHook` reads in the main process.  Lock-free: each
    process writes only its own slot (slot 0 for the main process, 1 + worker id for a
    dataloader worker), the reader sums the slots.
    """

    SLOTS = 64
    RING = 4          # names kept per slot
    NAME_BYTES = 384

    def __init__(self) -> None:
        self._counts = mp.RawArray('q', self.SLOTS)
        self._names = mp.RawArray('c', self.SLOTS * self.RING * self.NAME_BYTES)
        self._local: Optional[dict] = None

    def _slot(self) -> int:
        import torch.utils.data
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % (self.SLOTS - 1)

    def record(self, path: str, reason: str) -> int:
        """Count one skipped file; returns the new total."""
        text = f'{path} ({reason})'.encode('utf-8', 'replace')[:self.NAME_BYTES - 1]
        if self._local is not None:
            self._local['count'] += 1
            self._local['names'].append(text.decode('utf-8', 'replace'))
            del self._local['names'][:-self.RING]
            return self._local['count']
        s = self._slot()
        i = self._counts[s]
        off = (s * self.RING + i % self.RING) * self.NAME_BYTES
        self._names[off:off + self.NAME_BYTES] = text.ljust(self.NAME_BYTES, b'\0')
        self._counts[s] = i + 1
        return self.count

    @property
    def count(self) -> int:
        if self._local is not None:
            return self._local['count']
        return int(sum(self._counts))

    def snapshot(self) -> List[int]:
        """Per-slot counts, to pass to :meth:`recent` later."""
        if self._local is not None:
            return [self._local['count']]
        return list(self._counts)

    def recent(self, since: Optional[List[int]] = None) -> List[str]:
        """Names (with reasons) of files skipped after ``since`` (a :meth:`snapshot`), at most
        the last ``RING`` per process."""
        if self._local is not None:
            new = self._local['count'] - (since[0] if since else 0)
            return self._local['names'][-new:] if new > 0 else []
        out = []
        for s, c in enumerate(list(self._counts)):
            lo = since[s] if since else 0
            for i in range(max(lo, c - self.RING), c):
                off = (s * self.RING + i % self.RING) * self.NAME_BYTES
                out.append(bytes(self._names[off:off + self.NAME_BYTES]).rstrip(b'\0')
                           .decode('utf-8', 'replace'))
        return out

    # Shared memory can only travel to a process being spawned; any other copy (pickling to
    # disk, to a running process) gets a private counter starting from the current values.
    def __getstate__(self):
        if self._local is None and get_spawning_popen() is not None:
            return {'shared': (self._counts, self._names)}
        return {'shared': None, 'count': self.count, 'names': self.recent()[-self.RING:]}

    def __setstate__(self, state):
        if state['shared'] is not None:
            self._counts, self._names = state['shared']
            self._local = None
        else:
            self._counts = self._names = None
            self._local = {'count': state['count'], 'names': list(state['names'])}

    def __deepcopy__(self, memo):
        return self  # copies of a pipeline keep counting into the same counters


# --------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------
@TRANSFORMS.register_module()
class RobustLoadImageFromFile(BaseTransform):
    """Load an image like mmcv's ``LoadImageFromFile``, robust to what datasets contain.

    Required keys: ``img_path``; optional ``height``/``width`` (the annotation record,
    used for the EXIF decision and the size check).  Added keys: ``img``, ``img_shape``,
    ``ori_shape``.

    Args:
        on_error: ``'skip'`` (default: warn naming the file, count, return ``None`` so the
            dataset draws another sample; for training) or ``'raise'`` (raise
            :class:`ImageLoadError` naming the file; for val/test pipelines).
        exif_orientation: ``'auto'`` | ``'apply'`` | ``'ignore'`` (module docstring).
        check_size: treat a decoded size that disagrees with the record as a failure.
        uint16_scaling: ``'full'`` | ``'minmax'`` for images deeper than 8 bits.
        alpha_background: ``None`` drops alpha; an ``(R, G, B)`` tuple composites onto it.
        color_type: ``'color'`` (BGR, 3 channels) or ``'grayscale'``.
        to_float32: return float32 pixels (values still 0..255).
        max_consecutive_errors: in skip mode, raise after this many failures in a row in
            one process (the data is then missing, not merely damaged).
        max_pixels: refuse images (or damaged headers) claiming more pixels than this.
        backend_args: mmengine file backend arguments, as in ``LoadImageFromFile``.
    """

    def __init__(self, on_error: str = 'skip', exif_orientation: str = 'auto',
                 check_size: bool = True, uint16_scaling: str = 'full',
                 alpha_background: Optional[Sequence[int]] = None,
                 color_type: str = 'color', to_float32: bool = False,
                 max_consecutive_errors: int = 50,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 backend_args: Optional[dict] = None) -> None:
        for name, value, allowed in (('on_error', on_error, ON_ERROR),
                                     ('exif_orientation', exif_orientation, EXIF_MODES),
                                     ('uint16_scaling', uint16_scaling, UINT16_SCALINGS),
                                     ('color_type', color_type, COLOR_TYPES)):
            if value not in allowed:
                raise ValueError(f'RobustLoadImageFromFile: {name} must be one of {allowed}, '
                                 f'got {value!r}')
        if alpha_background is not None and (len(alpha_background) != 3 or not all(
                0 <= int(c) <= 255 for c in alpha_background)):
            raise ValueError('RobustLoadImageFromFile: alpha_background must be None or an '
                             f'(R, G, B) tuple of 0..255 values, got {alpha_background!r}')
        if int(max_consecutive_errors) < 1:
            raise ValueError('RobustLoadImageFromFile: max_consecutive_errors must be >= 1, '
                             f'got {max_consecutive_errors}')
        self.on_error = on_error
        self.exif_orientation = exif_orientation
        self.check_size = check_size
        self.uint16_scaling = uint16_scaling
        self.alpha_background = None if alpha_background is None else tuple(
            int(c) for c in alpha_background)
        self.color_type = color_type
        self.to_float32 = to_float32
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.max_pixels = int(max_pixels)
        self.backend_args = None if backend_args is None else dict(backend_args)
        self.recorder = SkipRecorder()
        self._consecutive_errors = 0
        self._warned: set = set()

    @property
    def num_skipped(self) -> int:
        """Files skipped so far by this transform, in every dataloader worker."""
        return self.recorder.count

    def _expected_hw(self, results: dict) -> Optional[Tuple[int, int]]:
        h, w = results.get('height'), results.get('width')
        try:
            h, w = int(h), int(w)
        except (TypeError, ValueError):
            return None
        return (h, w) if h > 0 and w > 0 else None

    def transform(self, results: dict) -> Optional[dict]:
        path = results['img_path']
        try:
            try:
                buf = fileio.get(path, backend_args=self.backend_args)
            except FileNotFoundError:
                raise _error(path, 'file not found') from None
            except IsADirectoryError:
                raise _error(path, 'is a directory') from None
            except Exception as e:  # permissions, I/O errors, remote backends
                raise _error(path, f'cannot be read ({type(e).__name__}: {e})') from None
            img, info = decode_image(
                buf, path, exif_orientation=self.exif_orientation,
                expected_hw=self._expected_hw(results), check_size=self.check_size,
                uint16_scaling=self.uint16_scaling, alpha_background=self.alpha_background,
                color_type=self.color_type, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            return self._fail(path, err)
        self._consecutive_errors = 0
        if info['exif_ignored_for_annotations'] and path not in self._warned:
            self._warned.add(path)
            print_log(f'{path}: EXIF orientation {info["orientation"]} ignored, because the '
                      'annotation record gives the size of the stored (un-rotated) pixels',
                      logger='current', level=logging.WARNING)
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def _fail(self, path: str, err: ImageLoadError) -> None:
        if self.on_error == 'raise':
            raise err
        total = self.recorder.record(path, err.reason or str(err))
        self._consecutive_errors += 1
        if path not in self._warned:  # once per file and process; every skip is counted
            self._warned.add(path)
            print_log(f'skipped image {path}: {err.reason} (on_error=\'skip\'; {total} '
                      'skipped so far); the dataset draws another sample instead',
                      logger='current', level=logging.WARNING)
        if self._consecutive_errors >= self.max_consecutive_errors:
            n = self._consecutive_errors
            self._consecutive_errors = 0
            raise ImageLoadError(
                f'{n} images in a row could not be loaded (the last: {path}: {err.reason}); '
                'the data is probably missing rather than damaged: check data_root and '
                'data_prefix in the config (RobustLoadImageFromFile.max_consecutive_errors='
                f'{self.max_consecutive_errors})', path=path, reason=err.reason)
        return None

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(on_error={self.on_error!r}, '
                f'exif_orientation={self.exif_orientation!r}, check_size={self.check_size}, '
                f'uint16_scaling={self.uint16_scaling!r}, '
                f'alpha_background={self.alpha_background!r}, color_type={self.color_type!r}, '
                f'to_float32={self.to_float32}, '
                f'max_consecutive_errors={self.max_consecutive_errors}, '
                f'max_pixels={self.max_pixels}, backend_args={self.backend_args!r})')
