"""Test images: encoded bytes, random arrays and structured patterns (all made here, seeded)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: int = 40, fmt: str = "PNG") -> bytes:
    """A random grayscale image of size x (size + 6), encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 6), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def random_images(n: int, seed: int = 0, size: int = 48) -> list[np.ndarray]:
    """n random grayscale arrays of size x (size + 8)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8), dtype=np.uint8) for _ in range(n)]


def make_pattern_images(folder: Path, size: int = 48) -> list[Path]:
    """Structured images (flat, gradients, edges, texture) so the tiny models' outputs differ between them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size]
    patterns = {
        "black": np.zeros((size, size)), "white": np.full((size, size), 255),
        "hgrad": x * 255 / size, "vgrad": y * 255 / size, "checker": ((x // 4 + y // 4) % 2) * 255,
        "stripes": ((x // 3) % 2) * 255, "noise": rng.integers(0, 256, (size, size)),
        "dots": ((x % 8 < 2) & (y % 8 < 2)) * 255, "disc": (((x - 24) ** 2 + (y - 24) ** 2) < 200) * 255,
        "lowcontrast": 100 + rng.integers(0, 20, (size, size)),
    }
    paths = []
    for name, pixels in patterns.items():
        path = folder / f"{name}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths
