"""Model provenance in results: every result records its bundle id (sha256 of manifest.yaml) and Stage 2's
probabilities; a version-1 result database is migrated in place without losing or re-recording anything."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml

from edge_runtime.bundle import load_bundle
from edge_runtime.cli import main
from edge_runtime.inspector import Inspector
from edge_runtime.db.store import COLUMNS, SCHEMA_VERSION, StorageError, Store
from edge_runtime.service.watch import WatchService
from tests.support.images import png_bytes
from tests.support.watch import files_in, jsonl_rows, make_config, rows


def manifest_sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.yaml").read_bytes()).hexdigest()


def copy_with_threshold(bundle: Path, dest: Path, threshold: float) -> Path:
    """The same models under a changed manifest: another model version as far as provenance goes."""
    shutil.copytree(bundle, dest)
    manifest = yaml.safe_load((dest / "manifest.yaml").read_text(encoding="utf-8"))
    manifest["gating"]["stage1_threshold"] = threshold
    (dest / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return dest


def test_bundle_id_is_the_manifest_hash(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    assert bundle.bundle_id == manifest_sha(tiny_bundle) and len(bundle.bundle_id) == 64
    other = load_bundle(copy_with_threshold(tiny_bundle, tmp_path / "other", 0.7))
    assert other.bundle_id == manifest_sha(tmp_path / "other") != bundle.bundle_id


def test_inspection_result_carries_stage2_probabilities(tiny_bundle, tmp_path, capsys):
    insp = Inspector(copy_with_threshold(tiny_bundle, tmp_path / "always", 0.0), threads=1)
    r = insp.inspect(png_bytes(3))
    assert list(r.stage2_probs) == list(insp.stage2_classes)
    assert max(r.stage2_probs, key=r.stage2_probs.get) == r.defect_class
    assert r.stage2_probs[r.defect_class] == r.confidence
    never = Inspector(copy_with_threshold(tiny_bundle, tmp_path / "never", 1.0), threads=1)
    assert never.inspect(png_bytes(3)).stage2_probs is None
    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(3))
    assert main(["--models", str(tmp_path / "always"), "--json", "--threads", "1", str(img)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["stage2_probs"] == {c: round(p, 6) for c, p in r.stage2_probs.items()}


def test_service_records_bundle_id_and_stage2_probabilities(tiny_bundle, folders, tmp_path):   # noqa: F811
    defect_bundle = copy_with_threshold(tiny_bundle, tmp_path / "defect", 0.0)     # Stage 2 on every image
    clean_bundle = copy_with_threshold(tiny_bundle, tmp_path / "clean", 1.0)       # Stage 2 on none
    for i in range(3):
        (folders["watch"] / f"d{i}.png").write_bytes(png_bytes(i))
    assert WatchService(make_config(defect_bundle, folders)).run(once=True) == 0
    for i in range(2):
        (folders["watch"] / f"c{i}.png").write_bytes(png_bytes(10 + i))
    assert WatchService(make_config(clean_bundle, folders)).run(once=True) == 0

    recorded = {r["name"]: r for r in rows(folders["db"])}
    defect_id, clean_id = manifest_sha(defect_bundle), manifest_sha(clean_bundle)
    stage2 = load_bundle(defect_bundle).stage2_classes
    for i in range(3):
        r = recorded[f"d{i}.png"]
        assert r["bundle_id"] == defect_id
        probs = json.loads(r["stage2_probs"])
        assert list(probs) == list(stage2) and sum(probs.values()) == pytest.approx(1.0, abs=0.02)
        assert max(probs, key=probs.get) == r["defect_class"] and probs[r["defect_class"]] == r["confidence"]
    for i in range(2):
        r = recorded[f"c{i}.png"]
        assert r["bundle_id"] == clean_id and r["label"] == "clean" and r["stage2_probs"] is None
    con = sqlite3.connect(folders["db"])
    try:
        bundles = {b[0]: b[1:] for b in con.execute(
            "SELECT id, path, stage1_threshold, taxonomy, stage2_classes FROM bundles")}
    finally:
        con.close()
    assert set(bundles) == {defect_id, clean_id}
    assert bundles[defect_id][:2] == (str(defect_bundle.resolve()), 0.0)
    assert json.loads(bundles[defect_id][2])[0] == "clean" and json.loads(bundles[defect_id][3]) == list(stage2)
    journal = {j["name"]: j for j in jsonl_rows(folders["jsonl"])}
    assert journal["d0.png"]["bundle_id"] == defect_id
    assert journal["d0.png"]["stage2_probs"] == json.loads(recorded["d0.png"]["stage2_probs"])
    assert journal["c0.png"]["bundle_id"] == clean_id and journal["c0.png"]["stage2_probs"] is None


# The schema as version 1 wrote it (edge_runtime/db/store.py before provenance), to test the migration.
V1_SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, name TEXT NOT NULL, src_path TEXT NOT NULL,
    dest_path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('inspected', 'quarantined')), label TEXT, stage1_score REAL,
    defect_class TEXT, confidence REAL, review INTEGER, latency_ms REAL, reason TEXT, variant TEXT,
    state TEXT NOT NULL CHECK (state IN ('recorded', 'done', 'missing')), journaled INTEGER NOT NULL DEFAULT 0,
    recorded_at TEXT NOT NULL, done_at TEXT
);
CREATE INDEX results_state ON results(state) WHERE state != 'done';
CREATE INDEX results_journal ON results(journaled) WHERE journaled = 0;
CREATE INDEX results_dest ON results(dest_path);
CREATE INDEX results_src ON results(src_path, size, mtime_ns);
PRAGMA user_version = 1;
"""


def make_v1_db(path: Path, rows_: list[dict]) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V1_SCHEMA)
    for r in rows_:
        con.execute(f"INSERT INTO results ({', '.join(r)}) VALUES ({', '.join('?' * len(r))})", list(r.values()))
    con.commit()
    con.close()


def v1_row(name: str, data: bytes, src: Path, dest: Path, state: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    return {"key": f"{digest}/{name}", "name": name, "src_path": str(src), "dest_path": str(dest),
            "size": len(data), "mtime_ns": 0, "sha256": digest, "outcome": "inspected", "label": "bridges",
            "stage1_score": 0.9, "defect_class": "bridges", "confidence": 0.6, "review": 0, "latency_ms": 2.0,
            "variant": "int8", "state": state, "journaled": 1, "recorded_at": "2026-11-01T00:00:00.000+00:00"}


def test_version_1_database_is_migrated_and_stays_exactly_once(tiny_bundle, folders, inspector):  # noqa: F811
    """A v1 file with one finished result and one recorded-but-not-moved (the service was killed): after the
    upgrade the old rows are intact, the interrupted move is finished without re-recording, new results
    carry the bundle id."""
    done_data, pending_data = png_bytes(1), png_bytes(2)
    folders["processed"].mkdir()
    (folders["processed"] / "old.png").write_bytes(done_data)
    (folders["watch"] / "killed.png").write_bytes(pending_data)
    make_v1_db(folders["db"], [
        v1_row("old.png", done_data, folders["watch"] / "old.png", folders["processed"] / "old.png", "done"),
        v1_row("killed.png", pending_data, folders["watch"] / "killed.png", folders["processed"] / "killed.png",
               "recorded")])
    before = rows(folders["db"])
    (folders["watch"] / "new.png").write_bytes(png_bytes(3))

    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0

    con = sqlite3.connect(folders["db"])
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert tuple(r[1] for r in con.execute("PRAGMA table_info(results)")) == COLUMNS
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()
    assert {"results", "bundles", "reviews"} <= tables
    after = rows(folders["db"])
    assert [r["name"] for r in after] == ["old.png", "killed.png", "new.png"]      # nothing re-recorded
    for old, now in zip(before, after):
        assert {k: now[k] for k in old if k not in ("state", "done_at")} == {k: old[k] for k in old if k not in
                                                                             ("state", "done_at")}
        assert now["bundle_id"] is None and now["stage2_probs"] is None             # unknown, not invented
    assert after[1]["state"] == "done" and files_in(folders["processed"]) == {"old.png", "killed.png", "new.png"}
    assert after[2]["bundle_id"] == manifest_sha(tiny_bundle)
    assert [r["published"] for r in after] == [1, 1, 0]     # v3: history is not published when MQTT is turned on


def test_two_processes_opening_a_version_1_file_migrate_it_once(tmp_path):
    db = tmp_path / "v1.sqlite3"
    make_v1_db(db, [])
    barrier = threading.Barrier(4)
    errors, stores = [], []

    def open_it():
        barrier.wait()
        try:
            stores.append(Store(db))
        except Exception as exc:        # noqa: BLE001 - the test reports any failure
            errors.append(exc)
    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 4
    con = sqlite3.connect(db)
    try:
        assert [r[1] for r in con.execute("PRAGMA table_info(results)")].count("bundle_id") == 1
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    finally:
        con.close()


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "future.sqlite3"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1} is not supported"):
        Store(db)


@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    return Inspector(tiny_bundle, threads=1)
