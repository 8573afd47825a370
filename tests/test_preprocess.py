"""edge_runtime.preprocess: every format and colour mode -> uint8 HxWx3 gray; bad inputs -> ImageError."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from edge_runtime.preprocess import (ImageError, SUPPORTED_SUFFIXES, decode_image, is_supported,
                                     preprocess_array, preprocess_file)

GRAY = 100           # the known gray value every mode must carry through
SIZE = 24            # model size in these tests (source images are 40x30: the resize path runs)
SRC_W, SRC_H = 40, 30

# (suffix, Pillow format, mode, tolerance): every suffix x every mode its format can hold.
CASES = [
    ("png", "PNG", "L", 0), ("png", "PNG", "I;16", 0), ("png", "PNG", "RGB", 0),
    ("png", "PNG", "RGBA", 0), ("png", "PNG", "P", 0),
    ("jpg", "JPEG", "L", 3), ("jpg", "JPEG", "RGB", 3), ("jpg", "JPEG", "CMYK", 3),
    ("jpeg", "JPEG", "L", 3), ("jpeg", "JPEG", "RGB", 3), ("jpeg", "JPEG", "CMYK", 3),
    ("tif", "TIFF", "L", 0), ("tif", "TIFF", "I;16", 0), ("tif", "TIFF", "RGB", 0),
    ("tif", "TIFF", "RGBA", 0), ("tif", "TIFF", "P", 0), ("tif", "TIFF", "CMYK", 1),
    ("tiff", "TIFF", "L", 0), ("tiff", "TIFF", "I;16", 0), ("tiff", "TIFF", "RGB", 0),
    ("tiff", "TIFF", "CMYK", 1),
    ("bmp", "BMP", "L", 0), ("bmp", "BMP", "RGB", 0), ("bmp", "BMP", "RGBA", 0), ("bmp", "BMP", "P", 0),
]


def gray_image(mode: str, value: int = GRAY, size=(SRC_W, SRC_H)) -> Image.Image:
    """A uniform image of gray `value` in the given PIL mode (opaque, no dithering)."""
    w, h = size
    if mode == "I;16":
        return Image.fromarray(np.full((h, w), value * 257, dtype=np.uint16))     # 16-bit: v * 257
    if mode == "P":
        img = Image.new("P", size, 3)
        palette = [0, 0, 0] * 256
        palette[9:12] = [value, value, value]                                  # index 3 = our gray
        img.putpalette(palette)
        return img
    rgb = Image.new("RGB", size, (value, value, value))
    return rgb if mode == "RGB" else rgb.convert(mode)


def save(img: Image.Image, path, fmt: str) -> None:
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **kwargs)


def assert_model_input(out: np.ndarray, size=(SIZE, SIZE)) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (*size, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_supported_suffixes_cover_the_issue_list():
    assert set(SUPPORTED_SUFFIXES) == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
    assert is_supported("a/b/X.PNG") and is_supported("x.TiFf") and is_supported("x.jpeg")
    assert not is_supported("notes.txt") and not is_supported("png") and not is_supported("x.png.bak")


@pytest.mark.parametrize("suffix,fmt,mode,tol", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_every_format_and_mode_gives_gray_uint8_hwc(tmp_path, suffix, fmt, mode, tol):
    path = tmp_path / f"img.{suffix}"
    save(gray_image(mode), path, fmt)
    with Image.open(path) as check:            # the file really holds the mode under test
        if (fmt, mode) != ("BMP", "RGBA"):     # Pillow reads its own 32-bit BMP back as RGB
            assert check.mode.startswith(mode.split(";")[0])
    out = preprocess_file(path, SIZE)
    assert_model_input(out)
    assert np.abs(out.astype(int) - GRAY).max() <= tol, f"{suffix}/{mode}: got {np.unique(out)}"


@pytest.mark.parametrize("suffix,fmt", [("png", "PNG"), ("tif", "TIFF"), ("bmp", "BMP"), ("jpg", "JPEG")])
def test_structure_survives_and_file_bytes_and_array_paths_agree(tmp_path, suffix, fmt):
    """A gradient keeps its shape; file, bytes and array entry points give identical arrays."""
    ramp = np.tile(np.linspace(0, 255, SRC_W).round().astype(np.uint8), (SRC_H, 1))
    path = tmp_path / f"ramp.{suffix}"
    save(Image.fromarray(ramp), path, fmt)
    from_file = preprocess_file(path, SIZE)
    assert_model_input(from_file)
    assert np.array_equal(from_file, preprocess_file(path.read_bytes(), SIZE))
    assert np.array_equal(from_file, preprocess_array(decode_image(path), SIZE))
    row = from_file[SIZE // 2, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] < 20 and row[-1] > 235      # still a left-to-right ramp


def test_native_size_is_passed_through_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    path = tmp_path / "native.png"
    Image.fromarray(pixels).save(path)
    out = preprocess_file(path, SIZE)
    assert np.array_equal(out[..., 0], pixels)


def test_non_square_target_size(tmp_path):
    path = tmp_path / "g.png"
    gray_image("L").save(path)
    assert_model_input(preprocess_file(path, (20, 36)), size=(20, 36))


def test_sixteen_bit_keeps_absolute_level_not_stretched(tmp_path):
    """16-bit frames map by >> 8 (detector scale), so a dim frame stays dim rather than stretched."""
    frame = np.full((SRC_H, SRC_W), 40 * 257, dtype=np.uint16)
    frame[:, SRC_W // 2:] = 60 * 257
    path = tmp_path / "dim16.tif"
    Image.fromarray(frame).save(path)
    gray = decode_image(path)
    assert set(np.unique(gray)) == {40, 60}


def test_transparent_pixels_composite_on_black(tmp_path):
    rgba = np.zeros((SRC_H, SRC_W, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, : SRC_W // 2, 3] = 255                 # left half opaque, right half fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    gray = decode_image(path)
    assert np.all(gray[:, : SRC_W // 2] == 200) and np.all(gray[:, SRC_W // 2:] == 0)


def test_multipage_tiff_uses_first_frame(tmp_path):
    path = tmp_path / "stack.tif"
    first, second = gray_image("L", 30), gray_image("L", 220)
    first.save(path, save_all=True, append_images=[second])
    assert np.all(decode_image(path) == 30)


# ---------------------------------------------------------------------------------------------- bad input


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) that claims width x height, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def _valid_png_bytes() -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty"),
    ("truncated.png", _valid_png_bytes()[:2000], "truncated"),
    ("notes.png", b"these are lab notes, not an image\n" * 4, "not an image"),
    ("bomb.png", png_claiming(9000, 9000), "too large"),          # 81 Mpx > our 50 Mpx limit
    ("huge.png", png_claiming(100_000, 100_000), "too large"),    # beyond Pillow's own bomb limit
])
def test_bad_files_raise_image_error_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        preprocess_file(path, SIZE)
    if content:                                     # the same verdict from bytes in memory
        with pytest.raises(ImageError, match=reason):
            decode_image(content)
    assert path.read_bytes() == content             # the bad input is left exactly as it was


def test_missing_file_and_empty_bytes(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_limits_are_configurable(tmp_path):
    path = tmp_path / "g.png"
    gray_image("L").save(path)
    with pytest.raises(ImageError, match="too large"):
        decode_image(path, max_pixels=SRC_W * SRC_H - 1)
    with pytest.raises(ImageError, match="too large"):
        decode_image(path, max_bytes=path.stat().st_size - 1)
    assert decode_image(path, max_pixels=SRC_W * SRC_H).shape == (SRC_H, SRC_W)


# ----------------------------------------------------------------------------------------- preprocess_array


@pytest.mark.parametrize("name,array", [
    ("uint8 HxW", np.full((SRC_H, SRC_W), GRAY, np.uint8)),
    ("uint8 HxWx1", np.full((SRC_H, SRC_W, 1), GRAY, np.uint8)),
    ("uint16 HxW", np.full((SRC_H, SRC_W), GRAY * 257, np.uint16)),
    ("uint8 RGB", np.full((SRC_H, SRC_W, 3), GRAY, np.uint8)),
    ("uint8 RGBA", np.dstack([np.full((SRC_H, SRC_W, 3), GRAY, np.uint8),
                              np.full((SRC_H, SRC_W), 255, np.uint8)])),
])
def test_preprocess_array_keeps_gray_level(name, array):
    out = preprocess_array(array, SIZE)
    assert_model_input(out)
    assert np.all(out == GRAY), f"{name}: {np.unique(out)}"


def test_preprocess_array_colour_weights_follow_luma():
    red = np.zeros((SRC_H, SRC_W, 3), np.uint8)
    red[..., 0] = 255
    out = preprocess_array(red, SIZE)
    assert np.all(np.abs(out.astype(int) - 76) <= 1)          # ITU-R 601 luma of pure red: 0.299 * 255


def test_preprocess_array_float_is_min_max_scaled():
    ramp = np.tile(np.linspace(0.2, 0.4, SRC_W, dtype=np.float64), (SRC_H, 1))
    gray = preprocess_array(ramp, (SRC_H, SRC_W))[..., 0]
    assert gray[:, 0].max() == 0 and gray[:, -1].min() == 255
    assert np.all(np.diff(gray[0].astype(int)) >= 0)
    assert np.all(preprocess_array(np.full((4, 4), 0.5), SIZE) == 0)      # flat float frame: no signal


@pytest.mark.parametrize("array,reason", [
    (np.zeros((4, 4, 3), np.uint16), "uint8"),
    (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros(16, np.uint8), "shape"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "non-finite"),
])
def test_preprocess_array_rejects_bad_arrays(array, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess_array(array, SIZE)


def test_no_deprecated_pillow_calls():
    """preprocess must keep working when Pillow drops deprecated APIs (fromarray(mode=) goes in 13)."""
    arrays = [np.full((SRC_H, SRC_W), GRAY, np.uint8), np.full((SRC_H, SRC_W), 9000, np.uint16),
              np.ones((SRC_H, SRC_W)), np.zeros((SRC_H, SRC_W, 3), np.uint8),
              np.zeros((SRC_H, SRC_W, 4), np.uint8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for array in arrays:
            preprocess_array(array, SIZE)
