"""Dataset audit: unreadable files, exact duplicates, near duplicates and label conflicts.

Near duplicates follow ../shared/data/README.md: each image goes through the shared decode
(edge_runtime.preprocess.decode_image), becomes a 32x32 grayscale thumbnail, is z-scored, and two images
whose thumbnails correlate at >= cfg.audit.near_duplicate_correlation are near duplicates. That is robust to
resizing (every image is reduced to 32x32) and colour mode (the shared decode turns any mode into grayscale).
Pairs are joined into groups by connected components (union-find): a group always lands in one split.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.preprocess import RESAMPLE, ImageError, decode_image

THUMB_SIZE = 32
# A thumbnail whose std is below this (grey levels) is "flat": z-scoring would only amplify quantisation
# noise, so flat images match only thumbnails that are exactly equal.
FLAT_STD = 1.0


@dataclasses.dataclass
class ImageRecord:
    path: str
    label: str | None
    source: int                 # index of the --data folder
    sha256: str
    width: int
    height: int
    origin_split: str | None = None
    part: str = ""


@dataclasses.dataclass
class AuditResult:
    records: list[ImageRecord]
    skipped: list[dict]                        # {"path", "reason"}
    thumbs: np.ndarray                         # N x 1024 uint8
    pairs: list[tuple[int, int, float]]        # near-duplicate pairs (i < j, correlation)
    groups: list[list[int]]                    # components of size >= 2 (exact or near duplicates)
    group_of: list[int]                        # record index -> group id (-1 when alone)


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """2-D uint8 image -> 32x32 uint8 thumbnail (same resampling as the shared preprocessing)."""
    img = Image.fromarray(gray, mode="L").resize((THUMB_SIZE, THUMB_SIZE), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def read_image(path: str, max_pixels: int, max_bytes: int) -> tuple[str, np.ndarray, tuple[int, int]]:
    """sha256 of the file bytes, its thumbnail and (width, height). Raises ImageError with the reason."""
    gray = decode_image(path, max_pixels=max_pixels, max_bytes=max_bytes)
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest, thumbnail(gray), (gray.shape[1], gray.shape[0])


def zscore_rows(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled so that a dot product is the Pearson correlation; flat rows become zero. -> (Z, flat)."""
    x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    std = np.sqrt((x * x).mean(axis=1))
    flat = std < FLAT_STD
    scale = np.where(flat, 0.0, 1.0 / (np.maximum(std, 1e-12) * np.sqrt(x.shape[1])))
    return (x * scale[:, None]).astype(np.float32), flat


def near_duplicate_pairs(thumbs: np.ndarray, threshold: float, block: int = 1024) -> list[tuple[int, int, float]]:
    """All pairs (i < j) whose thumbnails correlate >= threshold, via blocked normalised matrix products."""
    n = len(thumbs)
    if n < 2:
        return []
    z, flat = zscore_rows(thumbs)
    pairs: list[tuple[int, int, float]] = []
    block = max(16, min(block, 25_000_000 // n))     # keep one block of similarities near 100 MB
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = z[start:stop] @ z[start:].T            # rows start..stop vs columns start..n
        rows, cols = np.nonzero(sims >= threshold - 1e-6)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i, j = start + r, start + c
            if j > i:
                pairs.append((i, j, float(min(1.0, sims[r, c]))))
    # Flat images: only exact thumbnail equality counts.
    by_bytes: dict[bytes, list[int]] = {}
    for i in np.flatnonzero(flat).tolist():
        by_bytes.setdefault(thumbs[i].tobytes(), []).append(i)
    for members in by_bytes.values():
        pairs += [(members[0], j, 1.0) for j in members[1:]]
    return sorted(pairs)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[int]]:
        comps: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            comps.setdefault(self.find(i), []).append(i)
        return sorted(comps.values(), key=lambda c: c[0])


def exact_duplicate_sets(records: list[ImageRecord]) -> list[list[int]]:
    """Record indices sharing a sha256, for every hash seen more than once."""
    by_hash: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_hash.setdefault(r.sha256, []).append(i)
    return [ix for ix in by_hash.values() if len(ix) > 1]


def audit_files(entries: list[dict], threshold: float, max_pixels: int, max_bytes: int,
                progress=None) -> AuditResult:
    """Decode every entry ({"path", "label", "source", ...}); skip bad files with the reason; find groups."""
    records: list[ImageRecord] = []
    thumbs: list[np.ndarray] = []
    skipped: list[dict] = []
    for k, e in enumerate(entries):
        try:
            digest, thumb, (w, h) = read_image(e["path"], max_pixels, max_bytes)
        except ImageError as exc:
            skipped.append({"path": e["path"], "reason": str(exc), "source": e["source"]})
            continue
        records.append(ImageRecord(path=e["path"], label=e.get("label"), source=e["source"], sha256=digest,
                                   width=w, height=h, origin_split=e.get("origin_split"),
                                   part=e.get("part", "")))
        thumbs.append(thumb)
        if progress and (k + 1) % 250 == 0:
            progress(k + 1, len(entries))
    thumb_arr = np.stack(thumbs) if thumbs else np.zeros((0, THUMB_SIZE, THUMB_SIZE), np.uint8)
    pairs = near_duplicate_pairs(thumb_arr, threshold)
    uf = UnionFind(len(records))
    for i, j, _c in pairs:
        uf.union(i, j)
    for members in exact_duplicate_sets(records):
        for j in members[1:]:
            uf.union(members[0], j)
    groups = [c for c in uf.components() if len(c) > 1]
    group_of = [-1] * len(records)
    for g, members in enumerate(groups):
        for i in members:
            group_of[i] = g
    return AuditResult(records=records, skipped=skipped, thumbs=thumb_arr, pairs=pairs, groups=groups,
                       group_of=group_of)


def group_labels(result: AuditResult, group: list[int]) -> list[str]:
    return sorted({result.records[i].label for i in group if result.records[i].label is not None})


def conflict_groups(result: AuditResult) -> list[int]:
    """Ids of groups whose members carry more than one label."""
    return [g for g, members in enumerate(result.groups) if len(group_labels(result, members)) > 1]
