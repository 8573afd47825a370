"""The one preprocessing used by training, calibration, evaluation and the runtime.

decode (png/jpg/tif/bmp, any PIL mode) -> 8-bit grayscale -> EXIF orientation -> resize to the model size
-> uint8 HxWx3. Normalisation is *not* done here: it lives inside the model graph, so the deployed model takes
raw uint8 pixels and there is no second copy of mean/std to drift out of sync.

Gray levels, so that the same picture scores the same whatever the file format:
    8-bit (L, P, RGB, ...)      as stored (colour: ITU-R 601 luma; transparent pixels composited on black)
    16-bit (I;16) and 32-bit integer (I)    value >> 8 (the detector's scale; integers outside 0..65535 are
                                clipped), so a dim frame stays dim
    float (F)                   intensities in [0, 1], scaled by 255 (values outside are clipped; NaN or
                                infinity refuse the image)
The EXIF Orientation tag is applied (the rule of PIL.ImageOps.exif_transpose).

Memory: a file is decoded once and converted to 8-bit gray in bands of rows, so beyond the file's bytes and
the decoded image only one byte per pixel is added; a JPEG is decoded straight to gray and, when it is much
larger than the model input, at a reduced scale (Image.draft). Before any pixel is decoded, the memory the
decode needs (file bytes + decoded image + the 8-bit copy) is estimated from the header and an image over
`max_decode_mb` is refused with the reason: a board must never be OOM-killed by one file.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_runtime.safeopen import open_regular

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# The decode limits, defined here only: the inspector's defaults, the service's max_image_pixels /
# max_file_bytes / max_decode_mb, and the most the training audit (configs/default.yaml audit:) accepts.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_DECODE_MB = 128
DEFAULT_LIMITS = {"max_pixels": DEFAULT_MAX_PIXELS, "max_bytes": DEFAULT_MAX_BYTES, "max_decode_mb": DEFAULT_MAX_DECODE_MB}
RESAMPLE = Image.Resampling.BILINEAR
BAND_PIXELS = 1 << 18       # convert to gray about this many pixels at a time (a few MB of temporaries)
DRAFT_GAP = 2               # a JPEG is decoded at no less than this multiple of the model size
# Bytes per pixel of Pillow's decoded image by mode (multi-band modes are stored 4 bytes per pixel).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,      # as
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,         # ImageOps.
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,             # exif_transpose
                8: Image.Transpose.ROTATE_90}


class ImageError(ValueError):
    """An input image cannot be used; the message says why (for reports and quarantine).

    incomplete: the file did not decode, which is also how a file still being written looks (truncated,
    empty, corrupt); the watch service retries such a file until its writer is surely done."""

    def __init__(self, message: str, *, incomplete: bool = False):
        super().__init__(message)
        self.incomplete = incomplete


def is_supported(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def _gray_band(img: Image.Image) -> np.ndarray:
    """A (small) image in any PIL mode -> 2-D uint8 gray, by the rules in the module docstring."""
    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16, copy=False)
        return (arr >> 8).astype(np.uint8)
    if mode == "I":
        arr = np.asarray(img, dtype=np.int32)
        return (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageError("image has non-finite pixel values (NaN or infinity)")
        return np.rint(np.clip(arr, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on black: transparent margins carry no signal.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "L":
        img = img.convert("RGB").convert("L")
    return np.asarray(img, dtype=np.uint8)


def _gray_image(img: Image.Image) -> Image.Image:
    """A decoded image -> mode "L", converted in bands of rows (one extra byte per pixel, whatever the mode)."""
    if img.mode == "L":
        return img
    w, h = img.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, BAND_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        out[top:top + rows] = _gray_band(img.crop((0, top, w, min(h, top + rows))))
    return Image.fromarray(out)


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 array."""
    return np.asarray(_gray_image(img), dtype=np.uint8)


def decode_cost(img: Image.Image, file_bytes: int) -> int:
    """Bytes needed to decode `img` (opened, not loaded): the file's bytes, the decoded image and its 8-bit
    gray copy (when the mode is not already 8-bit gray)."""
    w, h = img.size
    per_pixel = _BYTES_PER_PIXEL.get(img.mode, 4) + (0 if img.mode == "L" else 1)
    return file_bytes + w * h * per_pixel


def _read(source: str | os.PathLike | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    name = str(source)
    try:
        fh, st = open_regular(source)
        with fh:
            if st.st_size > max_bytes:
                raise ImageError(f"file too large ({st.st_size} bytes > {max_bytes})")
            return fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from exc


def _decode(source: str | os.PathLike | bytes, *, max_pixels: int, max_bytes: int, max_decode_mb: float,
            target: tuple[int, int] | None) -> Image.Image:
    """File or bytes -> oriented mode-"L" image. target (height, width): the size it will be resized to (a
    large JPEG may then be decoded at a reduced scale). Raises ImageError."""
    data = _read(source, max_bytes)
    if not data:
        raise ImageError("empty file (0 bytes)", incomplete=True)
    if len(data) > max_bytes:
        raise ImageError(f"file too large ({len(data)} bytes > {max_bytes})")
    try:
        # Not closed on the way out: a decoded 8-bit gray image is returned as it is (closing would free it);
        # the file object is an in-memory BytesIO.
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"image too large ({w}x{h} pixels > {max_pixels})")
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})")
        if img.format == "JPEG":
            # Decode straight to gray, and at 1/2, 1/4 or 1/8 scale while that stays >= DRAFT_GAP x target.
            img.draft("L", (target[1] * DRAFT_GAP, target[0] * DRAFT_GAP) if target else img.size)
        need = decode_cost(img, len(data))
        if need > max_decode_mb * 2**20:
            raise ImageError(f"image too large for the memory budget: {w}x{h} {img.mode} needs about "
                             f"{need / 2**20:.0f} MB to decode (> {max_decode_mb:g} MB)")
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:       # an unreadable EXIF block: no orientation, as if absent
            orientation = 1
        img.seek(0)             # multi-page TIFF: first frame
        img.load()              # forces a full decode: truncated files fail here, not later
        gray = _gray_image(img)
        del img
        return gray.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else gray
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image (unrecognised format)", incomplete=True) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except MemoryError as exc:
        raise ImageError("not enough memory to decode this image") from exc
    except Exception as exc:    # any failure to decode untrusted bytes is this file's problem, whatever its type
        detail = str(exc) if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)) \
            else f"{type(exc).__name__}: {exc}"
        raise ImageError(f"corrupt or truncated image: {detail}", incomplete=True) from exc


def decode_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_decode_mb: float = DEFAULT_MAX_DECODE_MB) -> np.ndarray:
    """Read an image file (or its bytes) into a 2-D uint8 grayscale array at full size. Raises ImageError."""
    gray = _decode(source, max_pixels=max_pixels, max_bytes=max_bytes, max_decode_mb=max_decode_mb, target=None)
    return np.asarray(gray, dtype=np.uint8)


def _resized(gray: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    if gray.size != (w, h):
        gray = gray.resize((w, h), RESAMPLE)
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


def resize_gray(gray: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """2-D uint8 -> resized uint8 HxWx3 (grayscale replicated to 3 channels)."""
    return _resized(Image.fromarray(np.asarray(gray, dtype=np.uint8)), size)


def preprocess_array(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """An in-memory image (HxW, HxWx1, HxWx3 or HxWx4; uint8/uint16/float) -> uint8 HxWx3. Gray levels as
    in files: other integers like 16-bit (>> 8), float in [0, 1]."""
    return to_model_input(gray_of_array(array), size)


def gray_of_array(array: np.ndarray) -> Image.Image:
    """An in-memory image -> 8-bit gray (the file rules), ready for to_model_input at any size."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            raise ImageError(f"colour arrays must be uint8, got {arr.dtype}")
        # No mode= argument: Pillow infers RGB/RGBA/I;16/F from shape and dtype (the argument is
        # deprecated in Pillow 11.3 and gone in 13).
        return Image.fromarray(to_grayscale(Image.fromarray(arr)))
    if arr.ndim != 2:
        raise ImageError(f"expected an image array HxW or HxWxC, got shape {arr.shape}")
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:      # integers: the 16-bit rule (>> 8)
        gray = to_grayscale(Image.fromarray(np.clip(arr, 0, 65535).astype(np.uint16)))
    elif arr.dtype != np.uint8:
        gray = to_grayscale(Image.fromarray(arr.astype(np.float32)))
    else:
        gray = arr
    return Image.fromarray(np.asarray(gray, dtype=np.uint8))


def preprocess_file(source: str | os.PathLike | bytes, size: int | tuple[int, int], **limits) -> np.ndarray:
    """The shared path: file -> uint8 HxWx3 at the model size."""
    return to_model_input(decode_for(source, size, **limits), size)


def decode_for(source: str | os.PathLike | bytes, size: int | tuple[int, int], **limits) -> Image.Image:
    """Decode a file once, for model inputs up to `size` (the largest stage's): 8-bit gray, oriented. Each stage
    then takes to_model_input(gray, its size): two stages of different sizes never decode twice."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    return _decode(source, target=target, **{**DEFAULT_LIMITS, **limits})


def to_model_input(gray: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """Decoded 8-bit gray -> the model input: bilinear resize, uint8 HxWx3."""
    return _resized(gray, size)

