"""sha256 of bytes and of files: the one hashing helper behind model bundles (written and checked) and the
watch service's keys (sha256 of each dropped image)."""
from __future__ import annotations

import hashlib
import os

from edge_runtime.safeopen import open_regular

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_fileobj(fh) -> str:
    """Hex digest of an open binary file from its current position, read in 1 MiB chunks (flat memory)."""
    h = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex digest of a regular file read in 1 MiB chunks (memory stays flat for any size; a FIFO is refused
    with NotRegularFile instead of blocking)."""
    fh, _ = open_regular(path)
    with fh:
        return sha256_fileobj(fh)
