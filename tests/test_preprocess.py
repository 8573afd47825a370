"""edge_runtime.preprocess: every format and colour mode -> uint8 HxWx3 gray; bad inputs -> ImageError."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from edge_runtime import preprocess
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


def test_exif_orientation_is_applied_as_pillow_does(tmp_path):
    """A frame stored sideways with EXIF Orientation 6 ("rotate 90 degrees clockwise to view") is read
    upright, exactly as PIL.ImageOps.exif_transpose shows it; training and runtime share this."""
    from PIL import ImageOps

    upright = np.zeros((SRC_H, SRC_W), np.uint8)
    upright[:4, :] = 250                                  # a bright band along the top
    upright[:, :3] = 120                                  # and a dimmer one down the left side
    stored = np.ascontiguousarray(np.rot90(upright, k=1))       # as a sideways sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    Image.fromarray(stored).save(path, exif=exif)
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(img)), upright)
    assert np.array_equal(decode_image(path), upright)
    assert np.array_equal(preprocess_file(path, (SRC_H, SRC_W))[..., 0], upright)


def test_same_picture_in_8_bit_16_bit_and_float_gives_the_same_pixels(tmp_path):
    """One dim picture saved as 8-bit, 16-bit, 32-bit integer and float [0, 1]: the same model input, so the
    same score (a float frame is not stretched by its own min/max, a dim frame stays dim)."""
    rng = np.random.default_rng(3)
    picture = rng.integers(20, 90, (SRC_H, SRC_W), dtype=np.uint8)
    variants = {"8bit.png": picture, "16bit.tif": picture.astype(np.uint16) * 257,
                "32bit.tif": picture.astype(np.int32) * 257, "float.tif": picture.astype(np.float32) / 255}
    outputs = {}
    for name, array in variants.items():
        Image.fromarray(array).save(tmp_path / name)
        outputs[name] = preprocess_file(tmp_path / name, SIZE)
        assert np.array_equal(decode_image(tmp_path / name), picture), name
    for name, out in outputs.items():
        assert np.array_equal(out, outputs["8bit.png"]), name
    for array in variants.values():                   # arrays in memory follow the same rules
        assert np.array_equal(preprocess_array(array, SIZE), outputs["8bit.png"])


def test_conversion_in_bands_equals_converting_the_whole_image(tmp_path, monkeypatch):
    """Gray conversion runs band by band (bounded memory); band edges must not show."""
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    whole = Image.alpha_composite(Image.new("RGBA", (23, 37), (0, 0, 0, 255)), Image.fromarray(rgba))
    expected = np.asarray(whole.convert("RGB").convert("L"))
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    monkeypatch.setattr(preprocess, "BAND_PIXELS", 23 * 5)        # 5 rows a band: 8 bands, the last short
    assert np.array_equal(decode_image(path), expected)
    sixteen = rng.integers(0, 65536, (37, 23), dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.tif")
    assert np.array_equal(decode_image(tmp_path / "s.tif"), (sixteen >> 8).astype(np.uint8))


def test_memory_budget_refuses_before_decoding_and_names_the_need(tmp_path):
    Image.new("RGBA", (1000, 1000), (50, 60, 70, 255)).save(tmp_path / "rgba.png")     # ~4.8 MB to decode
    Image.new("L", (1000, 1000), 60).save(tmp_path / "gray.png")                         # ~1 MB
    with pytest.raises(ImageError, match=r"memory budget: 1000x1000 RGBA needs about 5 MB to decode \(> 4 MB\)"):
        preprocess_file(tmp_path / "rgba.png", SIZE, max_decode_mb=4)
    assert preprocess_file(tmp_path / "gray.png", SIZE, max_decode_mb=4).shape == (SIZE, SIZE, 3)


def test_large_jpeg_is_decoded_at_reduced_scale_to_about_the_same_pixels(tmp_path):
    """A JPEG much larger than the model input is decoded straight to gray at 1/2..1/8 scale (Image.draft);
    what the model sees stays within a few gray levels of a full decode."""
    ramp = np.add.outer(np.linspace(0, 200, 960), np.linspace(0, 55, 1280)).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(ramp).convert("RGB").save(path, quality=95)
    full = decode_image(path)
    assert full.shape == (960, 1280)
    reduced = preprocess_file(path, SIZE)
    reference = np.asarray(Image.fromarray(full).resize((SIZE, SIZE), preprocess.RESAMPLE))
    assert np.abs(reduced[..., 0].astype(int) - reference).max() <= 3
    with Image.open(path) as img:          # what preprocess_file decoded: gray, 1/8 scale (1/64 of the pixels)
        img.draft("L", (SIZE * preprocess.DRAFT_GAP, SIZE * preprocess.DRAFT_GAP))
        assert (img.mode, img.size) == ("L", (160, 120))


def test_fifo_is_refused_without_blocking(tmp_path):
    import os
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match=r"not a regular file \(FIFO\)"):
        preprocess_file(tmp_path / "pipe.png", SIZE)


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


def test_preprocess_array_float_is_intensity_in_0_1_not_stretched():
    """Float arrays are intensities in [0, 1] (as float files): a dim ramp stays dim, a flat frame keeps its
    level, values outside [0, 1] are clipped."""
    ramp = np.tile(np.linspace(0.2, 0.4, SRC_W, dtype=np.float64), (SRC_H, 1))
    gray = preprocess_array(ramp, (SRC_H, SRC_W))[..., 0]
    assert gray[:, 0].max() == 51 and gray[:, -1].min() == 102        # 0.2 * 255, 0.4 * 255
    assert np.all(np.diff(gray[0].astype(int)) >= 0)
    assert np.all(preprocess_array(np.full((4, 4), 0.5), SIZE) == 128)
    assert np.all(preprocess_array(np.array([[-1.0, 7.0]]), (1, 2))[..., 0] == [0, 255])


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
