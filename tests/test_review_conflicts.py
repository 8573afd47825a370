"""Reviews that disagree (the same image content reviewed as two classes): the review server lists them with
both reviews, `edge-inspect adapt` and `edge-inspect export-labels` leave them out, name them and still use
every other review; once one is reviewed again to the other's label, the list is empty and both are used.
Real files, the real review server (`edge-inspect review`) over HTTP and the real commands as processes."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.db.store import Store
from edge_runtime.review.reviews import Reviews
from tests.support.bundles import TAXONOMY
from tests.support.paths import REPO
from tests.support.review import Client, add_result, class_png, start_review_cli

PER_CLASS = 3


@pytest.fixture
def site(tmp_path, tiny_bundle_v2):
    """A board's store recorded by the tiny bundle: PER_CLASS images of each class reviewed as their class, and
    one image dropped twice (dup_a, dup_b: one content) that ann reviewed as bridges and bob as other."""
    processed = tmp_path / "processed"
    processed.mkdir()
    db = tmp_path / "results.sqlite3"
    store = Store(db)
    bundle = load_bundle(tiny_bundle_v2)
    store.register_bundle(bundle)
    reviews = Reviews(store, processed)
    ids = {}
    for k, label in enumerate(TAXONOMY):
        for i in range(PER_CLASS):
            name = f"{label}_{i}.png"
            (processed / name).write_bytes(class_png(k, i))
            ids[name] = add_result(store, processed, name, label=label, score=0.7, bundle_id=bundle.bundle_id)
            reviews.add(ids[name], label, "ann", 0)
    twin = class_png(TAXONOMY.index("bridges"), 7)
    for name in ("dup_a.png", "dup_b.png"):
        (processed / name).write_bytes(twin)
        ids[name] = add_result(store, processed, name, label="bridges", score=0.7, bundle_id=bundle.bundle_id)
    first = reviews.add(ids["dup_a.png"], "bridges", "ann", 0)
    second = reviews.add(ids["dup_b.png"], "other", "bob", 0)
    store.close()
    return {"db": db, "processed": processed, "ids": ids, "root": tmp_path, "sha256": hashlib.sha256(twin).hexdigest(),
            "reviews": {"dup_a.png": first, "dup_b.png": second}}


@pytest.fixture
def client(site):
    proc, url = start_review_cli(site["db"])
    try:
        yield Client(int(url.rstrip("/").rsplit(":", 1)[1]))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def adapt(site, out: str) -> tuple[subprocess.CompletedProcess, dict]:
    res = run("adapt", "--db", str(site["db"]), "--out", str(site["root"] / out), "--threads", "1")
    assert res.returncode == 0, res.stderr
    return res, json.loads((site["root"] / out / "adapt_report.json").read_text())


def export(site, out: str) -> tuple[subprocess.CompletedProcess, set[int]]:
    res = run("export-labels", "--db", str(site["db"]), "--out", str(site["root"] / out))
    with open(site["root"] / out / "export_manifest.csv", newline="", encoding="utf-8") as fh:
        return res, {int(row["result_id"]) for row in csv.DictReader(fh)}


def test_reviews_that_disagree_are_listed_left_out_and_used_again_once_settled(site, client):
    a, b = site["ids"]["dup_a.png"], site["ids"]["dup_b.png"]
    others = {rid for name, rid in site["ids"].items() if not name.startswith("dup_")}

    # the review server lists the conflict with both reviews
    status, listed = client.get("/api/conflicts")
    assert status == 200
    assert listed["images"] == 2
    [conflict] = listed["conflicts"]
    assert conflict["sha256"] == site["sha256"]
    assert [(i["id"], i["name"], i["label"], i["reviewer"], i["review_id"], i["reviewed_at"]) for i in conflict["items"]] \
        == [(a, "dup_a.png", "bridges", "ann", site["reviews"]["dup_a.png"]["id"],
             site["reviews"]["dup_a.png"]["reviewed_at"]),
            (b, "dup_b.png", "other", "bob", site["reviews"]["dup_b.png"]["id"],
             site["reviews"]["dup_b.png"]["reviewed_at"])]
    assert client.get("/api/summary")[1]["states"]["corrected"] == 1        # the summary answers as before

    # adapt runs on every other review, writes the bundle and names the two left out
    res, report = adapt(site, "fab-1")
    assert report["images"] == len(others) and load_bundle(site["root"] / "fab-1").manifest["adapted"]["images"] \
        == len(others)
    assert report["conflicts_left_out"] == {"conflicts": 1, "images": 2, "items": [
        {"sha256": site["sha256"], "images": [{"id": f"result {a}", "label": "bridges"},
                                              {"id": f"result {b}", "label": "other"}]}]}
    assert "2 image(s) left out" in res.stderr and f"'bridges' (result {a}), 'other' (result {b})" in res.stderr
    assert site["sha256"][:16] in res.stderr and "review page" in res.stderr

    # export-labels leaves them out too, says so (exit 1: images left out), and exports the rest
    res, exported = export(site, "reviewed-1")
    assert res.returncode == 1, res.stderr
    assert exported == others
    assert f"results {a}, {b}: not exported" in res.stderr and site["sha256"][:16] in res.stderr
    assert "2 left out, their reviews disagree (1 conflict(s))" in res.stderr

    # bob reviews dup_b again as bridges (the normal review POST): the conflict is gone, both are used
    status, body = client.review(b, "bridges", reviewer="bob", expected=site["reviews"]["dup_b.png"]["id"])
    assert status == 201 and body["item"]["label"] == "bridges"
    assert client.get("/api/conflicts")[1] == {"conflicts": [], "images": 0}
    res, report = adapt(site, "fab-2")
    assert report["images"] == len(others) + 2 and report["per_class"]["bridges"] == PER_CLASS + 2
    assert report["conflicts_left_out"] == {"conflicts": 0, "images": 0, "items": []}
    assert "left out" not in res.stderr
    res, exported = export(site, "reviewed-2")
    assert res.returncode == 0, res.stderr
    assert exported == others | {a, b}


def test_copies_that_agree_and_unusable_reviews_are_no_conflict(site, client):
    """Only different classes disagree: two copies under one class are both kept, and a copy marked unusable
    is simply not training data (the other copy's class stands)."""
    a, b = site["ids"]["dup_a.png"], site["ids"]["dup_b.png"]
    assert client.review(b, "unusable", reviewer="bob", expected=site["reviews"]["dup_b.png"]["id"])[0] == 201
    assert client.get("/api/conflicts")[1] == {"conflicts": [], "images": 0}
    status, latest = client.get(f"/api/results/{b}")
    assert client.review(b, "bridges", reviewer="bob", expected=latest["review"]["id"])[0] == 201
    assert client.get("/api/conflicts")[1]["conflicts"] == []
    res, exported = export(site, "reviewed")
    assert res.returncode == 0, res.stderr
    assert {a, b} <= exported
