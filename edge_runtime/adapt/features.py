"""Features of images through a bundle's backbones, and the replay set a bundle carries.

Adaptation fits new heads on features, never on pixels: each image is decoded once, resized for each stage,
run through that stage's backbone (exactly as the Inspector does), and the pooled feature vectors are kept.
The replay set is the same thing for the public training images, stored in the bundle (replay.npz, float16)
so a refit on a fab's few labels keeps what the public data taught.

    replay.npz   stage1 (N, D1) float16, stage2 (N, D2) float16, labels (N,) int16 indices into the taxonomy,
                 sha256 (N,) the images' content hashes (so a fab's copy of a public training image is recognised)
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.bundle import MANIFEST, Bundle, BundleError
from edge_runtime.digest import sha256_bytes
from edge_runtime.inspector import Inspector
from edge_runtime.preprocess import ImageError, to_model_input
from edge_runtime.safeopen import open_regular

MAX_REPLAY_BYTES = 256 * 2**20


@dataclass
class FeatureSet:
    """Per stage (N, D) float32 features, with the label and source of each row."""
    stage1: np.ndarray
    stage2: np.ndarray
    labels: list[str]
    paths: list[str]
    digests: list[str] = field(default_factory=list)   # content sha256 per row, where known (the replay set)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> "FeatureSet":
        rows = np.asarray(rows, np.int64)
        return FeatureSet(self.stage1[rows], self.stage2[rows], [self.labels[i] for i in rows],
                          [self.paths[i] for i in rows], [self.digests[i] for i in rows] if self.digests else [])

    @classmethod
    def concat(cls, sets: list["FeatureSet"]) -> "FeatureSet":
        return cls(np.concatenate([s.stage1 for s in sets]), np.concatenate([s.stage2 for s in sets]),
                   [x for s in sets for x in s.labels], [x for s in sets for x in s.paths])


def extract(inspector: Inspector, items: list[tuple], progress=None) -> tuple[FeatureSet, list[tuple[str, str]]]:
    """items: (source, label) or (source, label, name); a source is a path, encoded bytes or an array, and its
    name (default: the path, else its position) is what `paths` and messages show. Returns the features of the
    readable images and (name, reason) for each one that could not be decoded."""
    f1, f2, labels, paths, skipped = [], [], [], [], []
    same = inspector.stages[1].size == inspector.stages[2].size
    for i, (source, label, *rest) in enumerate(items):
        name = rest[0] if rest else (str(source) if isinstance(source, (str, os.PathLike)) else f"#{i}")
        try:
            gray = inspector.decode(source)
        except ImageError as exc:
            skipped.append((name, str(exc)))
            continue
        pixels1 = to_model_input(gray, inspector.stages[1].size)
        f1.append(inspector.stages[1].features(pixels1))
        f2.append(inspector.stages[2].features(pixels1 if same else to_model_input(gray, inspector.stages[2].size)))
        labels.append(label)
        paths.append(name)
        if progress is not None:
            progress(i + 1, len(items))
    d1, d2 = (inspector.stages[n].runner._out.shape[-1] for n in (1, 2))
    return FeatureSet(np.asarray(f1, np.float32).reshape(-1, d1), np.asarray(f2, np.float32).reshape(-1, d2),
                      labels, paths), skipped


def replay_bytes(features: FeatureSet, taxonomy: tuple[str, ...], digests: list[str]) -> bytes:
    index = {c: i for i, c in enumerate(taxonomy)}
    buf = io.BytesIO()
    np.savez(buf, stage1=features.stage1.astype(np.float16), stage2=features.stage2.astype(np.float16),
             labels=np.array([index[x] for x in features.labels], np.int16),
             sha256=np.array(digests, dtype="S64"))
    return buf.getvalue()



def replay_description(features: FeatureSet, variant: str, what: str) -> dict:
    counts: dict[str, int] = {}
    for label in features.labels:
        counts[label] = counts.get(label, 0) + 1
    return {"images": len(features), "per_class": dict(sorted(counts.items())), "variant": variant, "source": what}


def _replay_data(bundle: Bundle) -> bytes:
    """The replay set's bytes, checked against the manifest."""
    where = bundle.root / MANIFEST
    if bundle.replay is None:
        raise BundleError(f"{where}: this bundle carries no replay set (replay.npz) of public training features; "
                          "adaptation needs one so a refit keeps what the public data taught: convert the run again "
                          "with this version (`python -m convert --int8 ...`)")
    spec = bundle.replay
    try:
        fh, st = open_regular(spec.path)
        with fh:
            if st.st_size > MAX_REPLAY_BYTES:
                raise BundleError(f"{spec.path}: replay set larger than {MAX_REPLAY_BYTES >> 20} MB")
            data = fh.read()
    except FileNotFoundError:
        raise BundleError(f"{spec.path}: replay set listed in the manifest is missing") from None
    except OSError as exc:
        raise BundleError(f"{spec.path}: cannot read the replay set: {exc.strerror or exc}") from exc
    if sha256_bytes(data) != spec.sha256:
        raise BundleError(f"{spec.path}: sha256 mismatch: the replay set was changed or damaged")
    return data


def _arrays(data: bytes, where) -> dict:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            out = {k: z[k] for k in ("stage1", "stage2", "labels")}
            if "sha256" in z.files:
                out["sha256"] = [h.decode("ascii", "replace") for h in z["sha256"]]
            return out
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{where}: not a replay set: {exc}") from None


def load_replay(bundle: Bundle) -> FeatureSet:
    """The bundle's replay set, sha256-checked and shape-checked against its backbones. BundleError when the
    bundle has none or it does not fit."""
    spec = bundle.replay
    arrays = _arrays(_replay_data(bundle), spec.path)
    s1, s2, labels = arrays["stage1"], arrays["stage2"], arrays["labels"]
    n = len(labels)
    dims = {n_: bundle.heads[n_].features if bundle.heads.get(n_) else None for n_ in (1, 2)}
    if s1.shape[0] != n or s2.shape[0] != n or s1.ndim != 2 or s2.ndim != 2 or \
            (dims[1] and s1.shape[1] != dims[1]) or (dims[2] and s2.shape[1] != dims[2]):
        raise BundleError(f"{spec.path}: shapes {s1.shape} {s2.shape} {labels.shape} do not fit the backbones")
    if n and (labels.min() < 0 or labels.max() >= len(bundle.taxonomy)):
        raise BundleError(f"{spec.path}: labels outside the taxonomy")
    return FeatureSet(s1.astype(np.float32), s2.astype(np.float32), [bundle.taxonomy[i] for i in labels],
                      ["(replay)"] * n, digests=arrays.get("sha256", []))
