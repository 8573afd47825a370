"""`edge-inspect export-labels`: reviewed images -> the class-folder layout `python -m train prepare` ingests,
with a manifest; the round trip through prepare keeps the reviewed labels and the duplicate audit keeps
copies of one image inside one split."""
from __future__ import annotations

import csv
import errno
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.bundle import load_bundle
from edge_runtime.cli import main
from edge_runtime.review.export_labels import MANIFEST
from edge_runtime.review.reviews import Reviews
from edge_runtime.db.store import Store
from tests.support.datasets import make_master, read_rows, run_prepare, save, smooth_image
from tests.support.hostile import HOSTILE_LABELS, HOSTILE_NAMES
from tests.support.paths import REPO
from tests.support.review import add_result, installed_board_config

PUBLIC = {"clean": 4, "bridges": 4, "cracks": 4, "opens": 4}     # make_master: seeds 0..15 in this order


def public_image(root: Path, label: str, k: int) -> Path:
    return root / label / f"img_{k:03d}.png"


@pytest.fixture
def fab(tmp_path, tiny_bundle):
    """Public data, and a board's store whose operators reviewed its images: some near or exact copies of public
    images (the same site imaged again), some new, some unusable or not reviewed."""
    public = make_master(tmp_path / "public", PUBLIC)
    processed = tmp_path / "site" / "processed"
    processed.mkdir(parents=True)
    db = tmp_path / "site" / "results.sqlite3"
    store = Store(db)
    bundle = load_bundle(tiny_bundle)
    store.register_bundle(bundle)
    bid = bundle.bundle_id

    def result(name, label, image=None, copy_of=None):
        dest = processed / name
        if copy_of is not None:
            shutil.copyfile(copy_of, dest)
        else:
            save(dest, image[0], size=image[1])
        return add_result(store, processed, name, label=label, score=0.8, confidence=0.5, bundle_id=bid)

    ids = {
        # bridges_001 (seed 5) imaged again at another size; the model said cracks, the operator: bridges
        "near": result("near.png", "cracks", (smooth_image(5), 80)),
        # cracks_002 (seed 10) dropped again byte for byte; confirmed
        "exact": result("exact.png", "cracks", copy_of=public_image(public, "cracks", 2)),
        # clean_003 (seed 3) again, but the operator calls it scratches: a label conflict with the public data
        "conflict": result("conflict.png", "clean", (smooth_image(3), 72)),
        "new_fixed": result("new1.png", "opens", (smooth_image(101), None)),      # corrected to clean
        "new_ok": result("new2.png", "opens", (smooth_image(102), None)),         # confirmed
        "pair_a": result("pair_a.png", "vias", (smooth_image(200), None)),        # one site twice: both vias
        "pair_b": result("pair_b.png", "vias", (smooth_image(200), 90)),
        "twice": result("twice.png", "bridges", (smooth_image(103), None)),       # corrected, then again
        "unusable": result("blurred.png", "bridges", (smooth_image(104), None)),
        "unreviewed": result("later.png", "bridges", (smooth_image(105), None)),
    }
    reviews = Reviews(store, processed)
    for key, label in (("near", "bridges"), ("exact", "cracks"), ("conflict", "scratches"), ("new_fixed", "clean"),
                       ("new_ok", "opens"), ("pair_a", "vias"), ("pair_b", "vias"), ("unusable", "unusable")):
        reviews.add(ids[key], label, "ann", 0)
    first = reviews.add(ids["twice"], "shorts", "ann", 0)
    reviews.add(ids["twice"], "other", "bob", first["id"])
    store.close()
    labels = {"near": "bridges", "exact": "cracks", "conflict": "scratches", "new_fixed": "clean", "new_ok": "opens",
              "pair_a": "vias", "pair_b": "vias", "twice": "other"}
    return {"public": public, "processed": processed, "db": db, "ids": ids, "labels": labels, "bundle_id": bid,
            "root": tmp_path}


def export(fab, out: Path, *extra) -> int:
    return main(["export-labels", "--db", str(fab["db"]), "--out", str(out), *extra])


def manifest(out: Path) -> list[dict]:
    with open(out / MANIFEST, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_export_writes_reviewed_labels_and_a_manifest(fab, capsys):
    out = fab["root"] / "reviewed"
    assert export(fab, out) == 0
    rows = {int(r["result_id"]): r for r in manifest(out)}
    by_key = {k: rows.get(i) for k, i in fab["ids"].items()}
    assert by_key["unusable"] is None and by_key["unreviewed"] is None     # neither is training data
    for key, label in fab["labels"].items():
        row = by_key[key]
        path = out / row["file"]
        assert row["label"] == label and path.parent.name == label, key
        assert path.read_bytes() == (fab["processed"] / Path(row["source_path"]).name).read_bytes()
        assert row["bundle_id"] == fab["bundle_id"] and row["sha256"] and row["reviewed_at"]
    assert by_key["near"]["model_label"] == "cracks" and by_key["near"]["reviewer"] == "ann"
    assert by_key["twice"]["model_label"] == "bridges" and by_key["twice"]["reviewer"] == "bob"   # the latest
    assert by_key["exact"]["source_path"] == str((fab["processed"] / "exact.png").resolve())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert on_disk == sorted(r["file"] for r in rows.values())
    assert "8 image(s) exported" in capsys.readouterr().err


def test_export_then_prepare_keeps_labels_and_duplicates_in_one_split(fab, capsys):
    out = fab["root"] / "reviewed"
    assert export(fab, out) == 0
    prepared = fab["root"] / "prepared"
    code, _, err = run_prepare(capsys, "--data", fab["public"], "--data", out, "--out", prepared)
    assert code == 0, err
    split = {r["path"]: (r["label"], r["split"]) for r in read_rows(prepared)}
    exported = {k: str((out / r["file"]).resolve()) for r in manifest(out)
                for k, i in fab["ids"].items() if int(r["result_id"]) == i}
    # ingested with the operators' labels (not the model's)
    for key in ("near", "new_fixed", "new_ok", "pair_a", "pair_b", "twice"):
        assert split[exported[key]][0] == fab["labels"][key], key
    # the same image seen twice is one unit of the split: it cannot be in train and in test
    near_twin = str(public_image(fab["public"], "bridges", 1).resolve())
    assert split[exported["near"]][1] == split[near_twin][1]
    assert split[exported["pair_a"]][1] == split[exported["pair_b"]][1]
    # a byte-for-byte copy keeps only the first (the public one); a label disagreement drops the whole group
    assert exported["exact"] not in split and str(public_image(fab["public"], "cracks", 2).resolve()) in split
    assert exported["conflict"] not in split and str(public_image(fab["public"], "clean", 3).resolve()) not in split
    audit = json.loads((prepared / "audit.json").read_text())
    groups = {m["path"]: g for g in audit["near_duplicate_groups"] for m in g["members"]}
    assert groups[exported["conflict"]]["conflict"] and groups[exported["conflict"]]["labels"] == ["clean", "scratches"]
    assert not groups[exported["near"]]["conflict"] and groups[exported["near"]]["sources"] == [0, 1]
    for g in audit["near_duplicate_groups"]:       # no group straddles splits
        members = [m["path"] for m in g["members"] if m["path"] in split]
        assert len({split[p][1] for p in members}) <= 1, g


def test_refuses_a_folder_that_is_not_an_export(fab, capsys):
    out = fab["root"] / "my documents"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export(fab, out) == 2
    assert "not empty and is not an earlier export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    a_file = fab["root"] / "file.txt"
    a_file.write_text("x")
    assert export(fab, a_file) == 2 and a_file.read_text() == "x"


def test_an_earlier_export_is_replaced_whole(fab, capsys):
    out = fab["root"] / "reviewed"
    assert export(fab, out) == 0
    (out / "opens" / "stale-file.png").write_bytes(b"from an earlier export")
    store = Store(fab["db"])
    reviews = Reviews(store, fab["processed"])
    latest = reviews.item(fab["ids"]["new_ok"])["review"]["id"]
    reviews.add(fab["ids"]["new_ok"], "unusable", "bob", latest)
    store.close()
    assert export(fab, out) == 0
    rows = manifest(out)
    assert fab["ids"]["new_ok"] not in [int(r["result_id"]) for r in rows] and len(rows) == 7
    assert not (out / "opens").exists()
    assert sorted(p.name for p in fab["root"].iterdir() if p.name.startswith(".")) == []   # no temporaries left


def test_images_that_cannot_be_exported_are_named_and_the_rest_exported(fab, capsys):
    processed = fab["processed"]
    (processed / "new1.png").unlink()                                   # gone
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(processed / "new2.png")   # changed since inspection
    outside = fab["root"] / "elsewhere.png"
    shutil.move(processed / "pair_a.png", outside)
    (processed / "pair_a.png").symlink_to(outside)                      # leads outside processed/
    out = fab["root"] / "reviewed"
    assert export(fab, out) == 1
    err = capsys.readouterr().err
    assert "new1.png: not exported: image file is missing" in err
    assert "new2.png: not exported: content differs" in err
    assert "pair_a.png: not exported: image is outside the processed folder" in err
    exported = {int(r["result_id"]) for r in manifest(out)}
    ids = fab["ids"]
    assert exported == {ids[k] for k in ("near", "exact", "conflict", "pair_b", "twice")}


def test_nothing_to_export(tmp_path, tiny_bundle, capsys):
    processed = tmp_path / "processed"
    processed.mkdir()
    store = Store(tmp_path / "results.sqlite3")
    store.register_bundle(load_bundle(tiny_bundle))
    add_result(store, processed, "a.png", label="opens", score=0.8, confidence=0.5)
    store.close()
    out = tmp_path / "reviewed"
    assert main(["export-labels", "--db", str(tmp_path / "results.sqlite3"), "--out", str(out)]) == 1
    assert "nothing to export" in capsys.readouterr().err and not out.exists()


# -- issue 19 points 3 and 10: hostile labels, names and cells ----------------------------------------------


def review_directly(db: Path, result_id: int, label: str, reviewer: str = "mallory") -> None:
    """A review written straight into the database (group-writable on a board), bypassing every check."""
    con = sqlite3.connect(db)
    latest = con.execute("SELECT coalesce(max(id), 0) FROM reviews WHERE result_id = ?", (result_id,)).fetchone()[0]
    con.execute("INSERT INTO reviews (result_id, supersedes, old_label, new_label, reviewer, reviewed_at) "
                "VALUES (?, ?, 'opens', ?, ?, '2026-12-02T00:00:00+00:00')", (result_id, latest, label, reviewer))
    con.commit()
    con.close()


def test_hostile_labels_and_file_names_never_write_outside_out(fab):
    """Labels from the database and file names from the drop folder, as a hostile user could leave them;
    `edge-inspect export-labels` as a process. Before: `Path(label) / ...` followed ../../ and absolute paths
    (exit 0, files outside). Now every path stays inside --out: hostile labels are skipped with the reason,
    hostile file names are exported under their class folder, and the manifest runs no formula."""
    store = Store(fab["db"])
    named = {name: add_result(store, fab["processed"], name, label="opens", score=0.8, confidence=0.5,
                              bundle_id=fab["bundle_id"], seed=300 + i) for i, name in enumerate(HOSTILE_NAMES)}
    labelled = {label: add_result(store, fab["processed"], f"hostile-{i}.png", label="opens", score=0.8,
                                  confidence=0.5, bundle_id=fab["bundle_id"], seed=400 + i)
                for i, label in enumerate(HOSTILE_LABELS)}
    store.close()
    for rid in named.values():
        review_directly(fab["db"], rid, "opens", reviewer='=HYPERLINK("http://evil","click")')
    for label, rid in labelled.items():
        review_directly(fab["db"], rid, label)
    root = fab["root"]
    before = {p for p in root.rglob("*")}
    out = root / "site" / "export"
    res = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "export-labels", "--db", str(fab["db"]),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    created = {p for p in root.rglob("*")} - before
    assert created and all(p == out or out in p.parents for p in created), sorted(map(str, created - {out}))
    assert not Path("/tmp/sem-export-absolute").exists() and not (root / "escaped").exists()
    assert res.returncode == 1, res.stderr
    for label, rid in labelled.items():
        assert f"result {rid}: " in res.stderr and "is not a class name" in res.stderr, label
    rows = {int(r["result_id"]): r for r in manifest(out)}
    assert not set(labelled.values()) & set(rows)
    for name, rid in named.items():
        row = rows[rid]
        assert (out / row["file"]).parent == out / "opens" and (out / row["file"]).name == f"{rid}-{name}"
        assert row["reviewer"] == "'" + '=HYPERLINK("http://evil","click")'   # shown as text by spreadsheets
    for row in rows.values():
        for value in row.values():
            assert value[:1] not in ("=", "+", "-", "@", "\t", "\r"), row


def test_a_failed_export_leaves_nothing(fab, monkeypatch):
    """A write that fails half-way (disk full) leaves neither --out nor a temporary folder behind."""
    from edge_runtime.review import export_labels
    real, copies = export_labels._copy, []

    def copy_then_fail(fh, st, dest):
        copies.append(dest)
        if len(copies) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, st, dest)
    monkeypatch.setattr(export_labels, "_copy", copy_then_fail)
    out = fab["root"] / "reviewed"
    listing = sorted(p.name for p in fab["root"].iterdir())
    assert export(fab, out) == 2
    assert not out.exists() and sorted(p.name for p in fab["root"].iterdir()) == listing


def test_a_database_whose_taxonomy_is_not_class_names_is_refused(fab, capsys):
    con = sqlite3.connect(fab["db"])
    con.execute("UPDATE bundles SET taxonomy = ?", (json.dumps(["clean", "../../x"]),))
    con.commit()
    con.close()
    out = fab["root"] / "reviewed"
    assert export(fab, out) == 2 and not out.exists()
    assert "taxonomy: '../../x' is not a class name" in capsys.readouterr().err


def test_the_service_config_gives_the_database_and_the_processed_folder(tmp_path, tiny_bundle, capsys):
    """`export-labels --config` on an installed board's layout (db and processed in separate folders, as in
    deploy/service.yaml) finds the reviewed images without --db or --processed; an explicit --db wins."""
    from edge_runtime.config.service_config import load_service_config

    config = installed_board_config(tmp_path, tiny_bundle)
    cfg = load_service_config(config)
    processed = Path(cfg.processed)
    store = Store(cfg.db)
    bundle = load_bundle(tiny_bundle)
    store.register_bundle(bundle)
    rid = add_result(store, processed, "a.png", label="bridges", score=0.9, confidence=0.5, bundle_id=bundle.bundle_id)
    Reviews(store, processed).add(rid, "cracks", "ann", 0)
    store.close()
    out = tmp_path / "reviewed"
    assert main(["export-labels", "--config", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    (row,) = manifest(out)
    assert row["label"] == "cracks" and (out / row["file"]).read_bytes() == (processed / "a.png").read_bytes()
    other = tmp_path / "other.sqlite3"
    Store(other).close()
    assert main(["export-labels", "--config", str(config), "--db", str(other), "--models", str(tiny_bundle),
                 "--out", str(out)]) == 1
    assert "nothing to export" in capsys.readouterr().err
