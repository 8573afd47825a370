"""Features of images already seen, by their content sha256, so a re-adaptation computes only the new ones.

One file per pair of backbones (FOLDER/features-KEY.npz; KEY: the selected variant's two model files' sha256
and this format's version), since a bundle derived from another shares its backbones and so its features. The
file is rewritten whole through a temporary and a rename (a kill leaves the old one or the new one); a damaged or
foreign file is ignored and replaced.
"""
from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.digest import sha256_bytes

log = logging.getLogger("edge_inspect.adapt")

VERSION = 1
MAX_ENTRIES = 50_000            # ~400 MB at most for two Lite0 stages: older entries go first


class FeatureCache:
    def __init__(self, folder: str | os.PathLike, bundle: Bundle):
        key = sha256_bytes(f"{VERSION} {bundle.variant} {bundle.stage(1).sha256} {bundle.stage(2).sha256}"
                           .encode("ascii"))[:32]
        self.path = Path(folder) / f"features-{key}.npz"
        self.known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.changed = False
        self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                digests = [d.decode("ascii") for d in z["sha256"]]
                s1, s2 = z["stage1"], z["stage2"]
            if len(digests) != len(s1) or len(digests) != len(s2):
                raise ValueError("row counts differ")
            self.known = {d: (s1[i], s2[i]) for i, d in enumerate(digests)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("adapt: feature cache %s unusable (%s); computing the features again", self.path, exc)

    def get(self, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.known.get(digest)

    def put(self, digest: str, stage1: np.ndarray, stage2: np.ndarray) -> None:
        self.known[digest] = (np.asarray(stage1, np.float32), np.asarray(stage2, np.float32))
        self.changed = True

    def save(self) -> None:
        if not self.changed or not self.known:
            return
        digests = list(self.known)[-MAX_ENTRIES:]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".npz", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, sha256=np.array(digests, dtype="S64"),
                         stage1=np.stack([self.known[d][0] for d in digests]),
                         stage2=np.stack([self.known[d][1] for d in digests]))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.changed = False
