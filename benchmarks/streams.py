"""Labelled images for the end-to-end benchmark, and streams mixing clean and defective images at a
chosen defect prevalence (the fraction of defective images a tool would send)."""
from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_runtime.preprocess import is_supported


def label_mapper() -> tuple[Callable[[str], str | None], str]:
    """The project's folder-name mapping (train.config's cfg.map_label) when available, else identity."""
    try:
        from train.config import load_config

        cfg = load_config()
        return cfg.map_label, "train.config map_label (configs/default.yaml aliases)"
    except Exception as exc:  # train/ absent on a board, or an unreadable config
        return (lambda name: name), f"folder name = label ({type(exc).__name__}: train.config unavailable)"


def discover_images(root: str | os.PathLike, map_label=None) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(path, label) for every supported image under `root`, label from its parent folder's name.

    Returns the items (sorted, reproducible) and {folder name: image count} of folders no label maps to.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a folder")
    map_label = map_label or (lambda name: name)
    items, unmapped = [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = sorted(f for f in filenames if is_supported(f) and not f.startswith("."))
        if not files or Path(dirpath) == root:
            continue
        folder = Path(dirpath).name
        label = map_label(folder)
        if label is None:
            unmapped[folder] = unmapped.get(folder, 0) + len(files)
            continue
        items.extend((str(Path(dirpath) / f), label) for f in files)
    return items, unmapped


def images_from_split_csv(path: str | os.PathLike, split: str = "test") -> list[tuple[str, str]]:
    """(path, label) rows of a run's split.csv (path,label,split), the given split (all rows if none has it)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [(r["path"], r["label"], r.get("split", "")) for r in csv.DictReader(fh)]
    chosen = [(p, lab) for p, lab, s in rows if s == split] or [(p, lab) for p, lab, _ in rows]
    return [(p, lab) for p, lab in chosen if Path(p).is_file()]


def split_pools(items, clean_label: str = "clean") -> tuple[list, list]:
    clean = [it for it in items if it[1] == clean_label]
    defective = [it for it in items if it[1] != clean_label]
    return clean, defective


def prevalence_stream(clean, defective, prevalence: float, length: int, seed: int = 0) -> list:
    """`length` items, round(prevalence * length) of them defective, in random order.

    Draws without replacement while a pool is large enough, with replacement beyond (a stream longer than
    the data re-uses images; decode + inference cost does not depend on having seen an image before)."""
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence {prevalence} is not in [0, 1]")
    if length < 1:
        raise ValueError("stream length must be at least 1")
    n_def = int(round(prevalence * length))
    n_clean = length - n_def
    if n_def and not defective:
        raise ValueError(f"prevalence {prevalence} needs defective images and none were found")
    if n_clean and not clean:
        raise ValueError(f"prevalence {prevalence} needs clean images and none were found")
    rng = np.random.default_rng(seed)

    def draw(pool, k):
        if k == 0:
            return []
        idx = rng.choice(len(pool), size=k, replace=k > len(pool))
        return [pool[i] for i in idx]

    stream = draw(defective, n_def) + draw(clean, n_clean)
    order = rng.permutation(len(stream))
    return [stream[i] for i in order]
