"""Image folders for `train prepare` (PIL-generated, distinct smooth images) and reading what it wrote."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from train.prepare import main as prepare_main


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A distinct, smooth grayscale image: a random 6x6 field upsampled (survives resizing)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(small, "L").resize((size, size), Image.Resampling.BICUBIC))


def save(path: Path, arr: np.ndarray, mode: str = "L", size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr, "L")
    if size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    if mode == "RGB":
        img = img.convert("RGB")
    elif mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    img.save(path)
    return path


def make_master(root: Path, classes: dict[str, int], seed0: int = 0) -> Path:
    """root/CLASS/img_k.png with `n` distinct images per class folder."""
    seed = seed0
    for folder, n in classes.items():
        for k in range(n):
            save(root / folder / f"img_{k:03d}.png", smooth_image(seed))
            seed += 1
    return root


def run_prepare(capsys, *args) -> tuple[int, str, str]:
    code = prepare_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_rows(out_dir: Path) -> list[dict]:
    with (out_dir / "split.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))
