"""A toy labelled dataset (clearly separable clean/defect patterns, a split.csv) and a tiny training profile
for `python -m train`."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.support.paths import REPO

TINY_PROFILE = dict(backbone="tiny_cnn", image_size=32, max_images_per_class=0, batch_size=16, epochs_frozen=0, epochs_finetune=12,
                    lr_frozen=0.003, lr_finetune=0.003, finetune_blocks=1, patience=12)
DEFECTS = ["bridges", "cracks", "opens"]


def pattern(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Clearly separable toy classes: flat noise (clean) vs stripes/checks per defect type."""
    yy, xx = np.mgrid[:size, :size]
    base = {"clean": np.zeros((size, size)),
            "bridges": ((yy // 4) % 2) * 120.0,
            "cracks": ((xx // 4) % 2) * 120.0,
            "opens": (((xx // 6) + (yy // 6)) % 2) * 120.0}[label]
    img = 60 + base + rng.normal(0, 12, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, per_split: dict[str, int], shuffle_labels: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for label in ["clean", *DEFECTS]:
        for split, n in per_split.items():
            for i in range(n):
                path = root / label / f"{split}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pattern(label, rng)).save(path)
                rows.append([str(path), label, split])
    if shuffle_labels:
        labels = [r[1] for r in rows]
        rng.shuffle(labels)
        rows = [[p, lab, s] for (p, _, s), lab in zip(rows, labels)]
    csv_path = root / "split.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return csv_path


def tiny_config(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    data["profiles"]["tiny"] = TINY_PROFILE
    data["models"]["stage1"]["dense_units"] = data["models"]["stage2"]["dense_units"] = 32
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
