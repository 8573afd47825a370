"""The watch service's JSONL journal: one JSON object per result, derived from the database.

Lines are appended after their rows are committed and fsynced before the rows are flagged journaled. On open,
a partial last line left by an interrupted write is cut off; at start-up the service re-emits rows not yet
flagged unless their id is already in the file's tail (ids_in_tail), so the file holds each result once.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edge_runtime.names import json_line

log = logging.getLogger("edge_inspect")


class Journal:
    TAIL_BYTES = 4 << 20

    def __init__(self, path: Path, durable: bool):
        self.path = path
        self.durable = durable
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "ab")
        self._cut_partial_line()

    def _cut_partial_line(self) -> None:
        """A kill in the middle of a write leaves a line without its newline: drop it (its row is not
        flagged journaled, so it is written again whole)."""
        size = self.fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            start = max(0, size - self.TAIL_BYTES)
            fh.seek(start)
            tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        new_size = start + cut + 1 if cut >= 0 else start
        log.warning("%s: removing a partial last line left by an interrupted write", self.path)
        self.fh.truncate(new_size)
        self.fh.seek(0, os.SEEK_END)
        os.fsync(self.fh.fileno())

    def ids_in_tail(self) -> set[int]:
        ids = set()
        with open(self.path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - self.TAIL_BYTES))
            for line in fh.read().splitlines():
                try:
                    ids.add(int(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
        return ids

    def append(self, obj: dict) -> None:
        """Write one line. It survives a process kill at once (flushed to the OS); it is fsynced by sync()
        before its row is flagged journaled, so a power loss can only lose lines that are re-emitted."""
        self.fh.write((json_line(obj) + "\n").encode("utf-8"))
        self.fh.flush()

    def sync(self) -> None:
        if self.durable:
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


def row_to_json(row: dict) -> dict:
    """The JSONL object for one result (the CLI's --json fields plus the service's own)."""
    review = row.get("review")
    return {"id": row["id"], "path": row["src_path"], "name": row["name"], "label": row.get("label"),
            "stage1_score": row.get("stage1_score"), "defect_class": row.get("defect_class"),
            "confidence": row.get("confidence"), "review": None if review is None else bool(review),
            "latency_ms": row.get("latency_ms"), "outcome": row["outcome"], "reason": row.get("reason"),
            "moved_to": row["dest_path"], "sha256": row.get("sha256"), "variant": row.get("variant"),
            "bundle_id": row.get("bundle_id"),
            "stage2_probs": json.loads(row["stage2_probs"]) if row.get("stage2_probs") else None,
            "recorded_at": row["recorded_at"]}
