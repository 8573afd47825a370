"""The int8 representative dataset: N train-split images, stratified by class, through the shared preprocessing.

Selection is deterministic for a seed: within each class the rows are sorted by path and shuffled with
numpy's default_rng(seed), so the same run + seed always calibrates on the same files. Each class gets a
share proportional to its train-split size, at least one image where N allows. An unreadable file is
skipped (reported with its reason) and the next file of the same class takes its place.

Input quantization: the converter sets the uint8 input tensor's scale/zero_point from the min/max pixel it
saw during calibration. The edge feeds raw 0..255 pixels and expects scale 1.0 / zero_point 0, so when the
calibration pixels do not already span 0..255 one pixel of the first image is set to 0 and one to 255
(`anchor_input_range`). The model's first layers are a fixed rescale (x/127.5-1 or x/255 then mean/std), so
this only makes the calibrated input range the full pixel range it is anyway; two pixels out of N*H*W leave
the other activation ranges practically unchanged. The manifest records whether the anchor was applied.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.preprocess import ImageError, preprocess_file

DEFAULT_COUNT = 200


class CalibrationError(ValueError):
    """No usable calibration set (empty split, every file unreadable, bad N)."""


@dataclass
class Calibration:
    images: np.ndarray                      # N x H x W x 3 uint8, the shared preprocessing's output
    files: list[str]                        # the files used, in the order fed to the converter
    labels: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    requested: int = 0
    split: str = "train"
    seed: int = 0
    anchored: bool = False

    def per_class(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {k: counts[k] for k in sorted(counts)}

    def record(self, files_name: str = "calibration.txt") -> dict:
        """The manifest's `calibration` section."""
        return {
            "count": len(self.files), "requested": self.requested, "split": self.split, "seed": self.seed,
            "per_class": self.per_class(), "files": files_name,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "input_range_anchor": self.anchored,
            "pixel_range": [int(self.images.min()), int(self.images.max())] if len(self.images) else None,
        }

    def files_text(self) -> str:
        """calibration.txt: the files used, one path per line (as written in split.csv)."""
        return "".join(f"{path}\n" for path in self.files)


def allocate(class_sizes: dict[str, int], n: int) -> dict[str, int]:
    """Per-class quotas summing to min(n, total): proportional (largest remainder), >= 1 per class if n allows."""
    sizes = {k: v for k, v in class_sizes.items() if v > 0}
    total = sum(sizes.values())
    n = min(n, total)
    if n <= 0:
        return {k: 0 for k in class_sizes}
    classes = sorted(sizes)
    if n < len(classes):
        # Fewer images than classes: the largest classes get one each.
        return {k: int(k in sorted(classes, key=lambda c: (-sizes[c], c))[:n]) for k in class_sizes}
    quota = {k: 1 for k in classes}  # every class is represented
    remaining = n - len(classes)
    if remaining > 0:
        # Proportional share of what is left, capped by what each class still has.
        spare = {k: sizes[k] - 1 for k in classes}
        spare_total = sum(spare.values())
        exact = {k: remaining * spare[k] / spare_total for k in classes}
        for k in classes:
            quota[k] += min(int(exact[k]), spare[k])
        left = n - sum(quota.values())
        by_remainder = sorted(classes, key=lambda k: (-(exact[k] - int(exact[k])), -sizes[k], k))
        while left > 0:
            for k in by_remainder:
                if left and quota[k] < sizes[k]:
                    quota[k] += 1
                    left -= 1
    return {k: quota.get(k, 0) for k in class_sizes}


def select(rows: list[tuple[str, str]], n: int, image_size: int, seed: int, *, split: str = "train",
           resolve=lambda p: p) -> Calibration:
    """rows: (path, label) of the calibration split. Returns the preprocessed images and the record."""
    if n < 1:
        raise CalibrationError(f"the calibration size must be at least 1 (got {n})")
    if not rows:
        raise CalibrationError(f"the {split} split has no images: nothing to calibrate int8 with")
    by_class: dict[str, list[str]] = {}
    for path, label in sorted(rows):
        by_class.setdefault(label, []).append(path)
    quota = allocate({k: len(v) for k, v in by_class.items()}, n)
    rng = np.random.default_rng(seed)
    images, files, labels, skipped = [], [], [], []
    for label in sorted(by_class):
        order = rng.permutation(len(by_class[label]))
        taken = 0
        for i in order:
            if taken >= quota[label]:
                break
            path = by_class[label][i]
            try:
                images.append(preprocess_file(resolve(path), image_size))
            except ImageError as exc:
                skipped.append((path, str(exc)))
                continue
            files.append(path)
            labels.append(label)
            taken += 1
    if not images:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise CalibrationError(f"no readable image in the {split} split to calibrate with ({len(skipped)} "
                               f"unreadable{': ' + reasons if reasons else ''})")
    return Calibration(images=np.stack(images), files=files, labels=labels, skipped=skipped, requested=n,
                       split=split, seed=seed)


def anchor_input_range(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """A copy whose pixels span exactly 0..255 (so the uint8 input quantizes to scale 1.0, zero_point 0)."""
    if images.min() == 0 and images.max() == 255:
        return images, False
    out = np.array(images, copy=True)
    out[0, 0, 0, :] = 0
    out[0, 0, 1, :] = 255
    return out, True
