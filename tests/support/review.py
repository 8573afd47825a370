"""A review site with known results (a result store and its processed/ folder), a client for the review
server's HTTP API, and `edge-inspect review` as a real process."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.bundle import load_bundle
from edge_runtime.db.store import Store, utc_now
from tests.support.paths import REPO

EDGE_INSPECT = Path(sys.executable).parent / "edge-inspect"
MISSING = object()      # Client.review: leave this key out of the body


def png(seed: int, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def class_png(k: int, i: int, seed: int = 0) -> bytes:
    """A 44x44 PNG whose gray level says its class (the k-th of the taxonomy), the i-th of that class: images
    a refit on the tiny bundle can learn."""
    rng = np.random.default_rng((seed, k, i))
    level = 20 + 28 * k
    img = np.clip(rng.normal(level, 6, (44, 44)), 0, 255).astype(np.uint8)
    img[(i * 5) % 40:(i * 5) % 40 + 4] = 255 - level
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def add_result(store: Store, processed: Path, name: str, *, label: str, score: float, flagged: bool = False,
               confidence: float | None = None, probs: dict | None = None, bundle_id: str | None = None,
               recorded_at: str | None = None, outcome: str = "inspected", dest: Path | None = None,
               seed: int = 0) -> int:
    """One result as the service records it (through the store's own insert), its image in `processed`."""
    dest = dest or processed / name
    if not dest.exists() and not dest.is_symlink():
        dest.write_bytes(png(seed))
    data = dest.read_bytes() if dest.exists() else b""
    digest = hashlib.sha256(data).hexdigest()
    clean = label == "clean"
    row = {"key": f"{digest}/{name}", "name": name, "src_path": str(processed.parent / "incoming" / name),
           "dest_path": str(dest), "size": len(data), "mtime_ns": 0, "sha256": digest, "outcome": outcome,
           "label": None if outcome != "inspected" else label, "stage1_score": score,
           "defect_class": None if clean else label,
           "confidence": (1 - score) if clean and confidence is None else confidence, "review": int(flagged),
           "latency_ms": 1.0, "reason": None if outcome == "inspected" else "corrupt", "variant": "int8",
           "state": "done", "journaled": 1, "recorded_at": recorded_at or utc_now(), "bundle_id": bundle_id,
           "stage2_probs": json.dumps(probs) if probs else None}
    return store.record(row)


def probs_for(top: str, p: float) -> dict:
    rest = [c for c in ("bridges", "cracks", "opens") if c != top]
    return {top: p, rest[0]: round((1 - p) * 0.6, 6), rest[1]: round((1 - p) * 0.4, 6)}


def make_review_site(root: Path, bundle_dir: Path) -> dict:
    """results.sqlite3 + processed/ beside it (the service's default layout). The tiny bundle's threshold is
    0.5; `order` is the queue order the rules give: flagged (least confident first), then Stage-1 margin,
    then results recorded before provenance (no bundle id)."""
    processed = root / "processed"
    processed.mkdir(parents=True)
    db = root / "results.sqlite3"
    store = Store(db)
    bundle = load_bundle(bundle_dir)
    store.register_bundle(bundle)
    bid = bundle.bundle_id
    ids = {}
    ids["a"] = add_result(store, processed, "a.png", label="bridges", score=0.9, flagged=True, confidence=0.45,
                          probs=probs_for("bridges", 0.45), bundle_id=bid, recorded_at="2026-11-01T10:00:00.000+00:00",
                          seed=1)
    ids["b"] = add_result(store, processed, "b.png", label="cracks", score=0.8, flagged=True, confidence=0.38,
                          probs=probs_for("cracks", 0.38), bundle_id=bid, recorded_at="2026-11-02T10:00:00.000+00:00",
                          seed=2)
    ids["c"] = add_result(store, processed, "c.png", label="opens", score=0.53, confidence=0.8,
                          probs=probs_for("opens", 0.8), bundle_id=bid, recorded_at="2026-11-03T10:00:00.000+00:00",
                          seed=3)
    ids["d"] = add_result(store, processed, "d.png", label="clean", score=0.30, bundle_id=bid,
                          recorded_at="2026-11-03T23:59:59.000+00:00", seed=4)
    ids["e"] = add_result(store, processed, "e.png", label="bridges", score=0.62, confidence=0.7,
                          probs=probs_for("bridges", 0.7), bundle_id=bid, recorded_at="2026-11-04T00:00:00.000+00:00",
                          seed=5)
    ids["f"] = add_result(store, processed, "f.png", label="cracks", score=0.51, confidence=0.7,
                          recorded_at="2026-11-05T10:00:00.000+00:00", seed=6)          # before provenance
    ids["q"] = add_result(store, root, "q.png", label="clean", score=0.0, outcome="quarantined", bundle_id=bid,
                          seed=7)
    store.close()
    order = [ids[k] for k in "bacedf"]
    return {"db": db, "processed": processed, "ids": ids, "order": order, "bundle_id": bid, "root": root}


class Client:
    """The review server's HTTP API on 127.0.0.1:PORT."""

    def __init__(self, port: int):
        self.port = port

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            con.request(method, path, body=body, headers=headers or {})
            resp = con.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            con.close()

    def get(self, path: str):
        status, headers, body = self.raw("GET", path)
        return status, (json.loads(body) if headers.get("Content-Type", "").startswith("application/json") else body)

    def review(self, result_id, label, reviewer="ann", expected=0, **extra):
        body = {"label": label, "reviewer": reviewer, "expected_review_id": expected, **extra}
        body = {k: v for k, v in body.items() if v is not MISSING}
        return self.post(f"/api/results/{result_id}/reviews", json.dumps(body).encode())

    def post(self, path: str, data: bytes, ctype: str = "application/json", headers: dict | None = None):
        status, _, body = self.raw("POST", path, data, {"Content-Type": ctype, **(headers or {})})
        return status, json.loads(body)


def db_rows(db: Path, sql: str, args=()) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def installed_board_config(root: Path, models: Path) -> Path:
    """deploy/service.yaml with its folders moved under `root`: as on an installed board, the database (db/) and
    the processed folder are separate folders, so no `processed` sits beside the database. The folders are made."""
    var = root / "var" / "lib" / "sem-inspect"
    text = (REPO / "deploy" / "service.yaml").read_text(encoding="utf-8")
    text = text.replace("/var/lib/sem-inspect", str(var)).replace("/opt/sem-inspect/models/current", str(models))
    for sub in ("incoming", "processed", "quarantine", "db"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    path = root / "etc" / "sem-inspect" / "service.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    assert not (var / "db" / "processed").exists()
    return path


def start_review_cli(db: Path | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """`edge-inspect review` as the console script (this checkout's code first on the path); returns the
    process and the URL it printed. db None: no --db (give --config in `extra`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([str(EDGE_INSPECT), "review", *(["--db", str(db)] if db else []),
                             "--http", "127.0.0.1:0", *extra],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stderr.readline()
    if "serving http://" not in line:
        proc.kill()
        raise AssertionError(f"review server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()      # keep the pipe drained
    return proc, line.split("serving ", 1)[1].split(" ", 1)[0]
