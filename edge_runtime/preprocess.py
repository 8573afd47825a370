"""The one preprocessing used by training, calibration, evaluation and the runtime.

decode (png/jpg/tif/bmp, any PIL mode) -> grayscale -> resize to the model size -> uint8 HxWx3.
Normalisation is *not* done here: it lives inside the model graph, so the deployed model takes raw
uint8 pixels and there is no second copy of mean/std to drift out of sync.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
RESAMPLE = Image.Resampling.BILINEAR


class ImageError(ValueError):
    """An input image cannot be used; the message says why (for reports and quarantine)."""


def is_supported(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SUPPORTED_SUFFIXES


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 array."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit SEM frames: keep the full 16-bit range, as the detector wrote it.
        arr = np.asarray(img, dtype=np.uint16)
        return (arr >> 8).astype(np.uint8)
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("image has non-finite pixel values (NaN or infinity)")
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on black: transparent margins carry no signal.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "L":
        img = img.convert("RGB").convert("L")
    return np.asarray(img, dtype=np.uint8)


def decode_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an image file (or its bytes) into a 2-D uint8 grayscale array. Raises ImageError."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "<bytes>"
    else:
        name = str(source)
        try:
            size = os.path.getsize(source)
        except OSError as exc:
            raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from exc
        if size == 0:
            raise ImageError("empty file (0 bytes)")
        if size > max_bytes:
            raise ImageError(f"file too large ({size} bytes > {max_bytes})")
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"image too large ({w}x{h} pixels > {max_pixels})")
            if w < 1 or h < 1:
                raise ImageError(f"image has no pixels ({w}x{h})")
            img.seek(0)          # multi-page TIFF: first frame
            img.load()           # forces a full decode: truncated files fail here, not later
            return to_grayscale(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from exc


def resize_gray(gray: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """2-D uint8 -> resized uint8 HxWx3 (grayscale replicated to 3 channels)."""
    h, w = (size, size) if isinstance(size, int) else size
    if gray.shape != (h, w):
        resized = Image.fromarray(np.asarray(gray, dtype=np.uint8)).resize((w, h), RESAMPLE)
        gray = np.asarray(resized, dtype=np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def preprocess_array(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """An in-memory image (HxW, HxWx1, HxWx3 or HxWx4; uint8/uint16/float) -> uint8 HxWx3."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            raise ImageError(f"colour arrays must be uint8, got {arr.dtype}")
        # No mode= argument: Pillow infers RGB/RGBA/I;16/F from shape and dtype (the argument is
        # deprecated in Pillow 11.3 and gone in 13).
        return resize_gray(to_grayscale(Image.fromarray(arr)), size)
    if arr.ndim != 2:
        raise ImageError(f"expected an image array HxW or HxWxC, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        gray = to_grayscale(Image.fromarray(arr))
    elif arr.dtype != np.uint8:
        gray = to_grayscale(Image.fromarray(arr.astype(np.float32)))
    else:
        gray = arr
    return resize_gray(gray, size)


def preprocess_file(source: str | os.PathLike | bytes, size: int | tuple[int, int], **limits) -> np.ndarray:
    """The shared path: file -> uint8 HxWx3 at the model size."""
    return resize_gray(decode_image(source, **limits), size)
