"""sha256 of bytes and of files: the one hashing helper behind model bundles (written and checked) and the
watch service's keys (sha256 of each dropped image)."""
from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex digest of a file read in 1 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
