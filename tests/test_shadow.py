"""Shadow runs and swaps inside the watch service (in-process, with its HTTP API): the candidate's answers are
stored apart and never replace a result, a fraction bounds the images it sees, the comparison (per class,
Stage-1, reviewed images) and its latency reach /metrics, /healthz and the MQTT stats message; a bundle that does
not load leaves the current one running and says why."""
from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest

from edge_runtime.adapt.derive import derive_bundle
from edge_runtime.bundle import load_bundle
from edge_runtime.db.store import Store
from edge_runtime.inspector import Inspector
from edge_runtime.service.watch import WatchService
from tests.support.images import png_bytes
from tests.support.waiting import wait_until
from tests.support.watch import files_in, make_config, rows, run_in_thread

pytest.importorskip("prometheus_client", reason="the HTTP API needs prometheus-client")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_bundle_v2):
    """The current bundle and a candidate whose Stage-1 threshold flips the decisions on the test images."""
    root = tmp_path_factory.mktemp("pair")
    current = load_bundle(tiny_bundle_v2)
    insp = Inspector(current, threads=1)
    defective = sum(insp.inspect(png_bytes(s)).defect_class is not None for s in range(20))
    candidate = derive_bundle(current, root / "candidate", gating={"stage1_threshold": 0.0 if defective < 10 else 1.0},
                              extra={"source_run": "tests-candidate"})
    return tiny_bundle_v2, candidate


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_shadow_is_stored_apart_and_reported(pair, folders):
    current, candidate = pair
    cfg = make_config(current, folders, shadow=str(candidate), http="127.0.0.1:0", threads=1)
    for i in range(12):
        (folders["watch"] / f"w{i}.png").write_bytes(png_bytes(i))
    service = WatchService(cfg)
    thread, out = run_in_thread(service)
    try:
        wait_until(lambda: len(files_in(folders["processed"])) == 12, 240, lambda: files_in(folders["processed"]))
        recorded = rows(folders["db"])
        review_store = Store(folders["db"])       # an operator reviews two images: the candidate was right on one
        try:
            con = review_store.db
            for r, label in ((recorded[0], recorded[0]["label"]), (recorded[1], "vias")):
                con.execute("INSERT INTO reviews (result_id, old_label, new_label, reviewer, reviewed_at) "
                            "VALUES (?, ?, ?, 'ann', '2026-12-02T00:00:00+00:00')", (r["id"], r["label"], label))
        finally:
            review_store.close()
        wait_until(lambda: service.bundles.shadow.snapshot["reviewed"]["images"] == 2,
                   describe=lambda: service.bundles.shadow.snapshot["reviewed"]["images"])
        health = json.loads(get(service.http.url + "/healthz"))
        metrics = get(service.http.url + "/metrics")
        stats = service.status.stats_message()
    finally:
        service.stop()
        thread.join(30)
    assert out["rc"] == 0
    # the results are the current bundle's, exactly as without a shadow
    plain = Inspector(current, threads=1)
    for r in recorded:
        assert r["label"] == plain.inspect(png_bytes(int(r["name"][1:-4]))).label
        assert r["bundle_id"] == load_bundle(current).bundle_id
    cand_id = load_bundle(candidate).bundle_id
    shadows = {s["result_id"]: s for s in rows_of(folders["db"], "SELECT * FROM shadow_results")}
    assert sorted(shadows) == [r["id"] for r in recorded]
    assert all(s["candidate_id"] == cand_id for s in shadows.values())
    agree = sum(s["agree"] for s in shadows.values())
    assert agree < 12                                   # the flipped threshold disagrees somewhere
    b = health["bundle"]
    assert b["candidate"] == cand_id and b["shadow"]["images"] == 12
    assert b["shadow"]["agreement"] == pytest.approx(agree / 12)
    assert b["shadow"]["reviewed"]["images"] == 2 and b["shadow"]["reviewed"]["current_right"] >= 1
    assert set(b["shadow"]["per_class"]) == {r["label"] for r in recorded}
    assert f'sem_inspect_shadow_agreement{{scope="label"}} {agree / 12}' in metrics
    assert 'sem_inspect_shadow_agreement{scope="stage1"}' in metrics
    assert "sem_inspect_shadow_class_agreement{label=" in metrics
    assert 'sem_inspect_shadow_reviewed{which="candidate"}' in metrics
    assert "sem_inspect_shadow_latency_seconds_count 12.0" in metrics
    assert f'sem_inspect_bundle_info{{bundle_id="{cand_id}",role="candidate"}} 1.0' in metrics
    assert stats["shadow"]["images"] == 12 and stats["bundle_id"] == health["bundle_id"]


def rows_of(db, sql):
    import sqlite3
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def test_a_fraction_bounds_the_shadowed_images(pair, folders):
    current, candidate = pair
    for i in range(40):
        (folders["watch"] / f"f{i}.png").write_bytes(png_bytes(100 + i))
    cfg = make_config(current, folders, shadow=str(candidate), shadow_fraction=0.25, threads=1)
    assert WatchService(cfg).run(once=True) == 0
    shadowed = rows_of(folders["db"], "SELECT r.sha256 FROM shadow_results s JOIN results r ON r.id = s.result_id")
    assert 2 <= len(shadowed) <= 20                  # about a quarter, chosen by the image's sha256
    assert all(int(s["sha256"][:8], 16) < 0.25 * 2**32 for s in shadowed)


def test_a_bundle_that_does_not_load_leaves_the_old_one_and_says_why(pair, folders, tmp_path):
    current, _ = pair
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(current, models / "good")
    broken = models / "broken"
    shutil.copytree(current, broken)
    (broken / "stage1.tflite").write_bytes(b"damaged")
    os.symlink(models / "good", models / "current")
    cfg = make_config(models / "current", folders, http="127.0.0.1:0", threads=1)
    service = WatchService(cfg)
    thread, out = run_in_thread(service)
    try:
        os.symlink(models / "broken", models / "next")
        os.replace(models / "next", models / "current")     # re-pointed: seen on the next tick
        wait_until(lambda: service.bundles.error is not None, describe=lambda: service.bundles.error)
        health = json.loads(get(service.http.url + "/healthz"))
        (folders["watch"] / "after.png").write_bytes(png_bytes(7))
        wait_until(lambda: len(files_in(folders["processed"])) == 1, 120, lambda: files_in(folders["processed"]))
    finally:
        service.stop()
        thread.join(30)
    assert health["ok"] and "sha256 mismatch" in health["bundle"]["error"]["error"]
    assert health["bundle_id"] == load_bundle(current).bundle_id
    assert rows(folders["db"])[0]["bundle_id"] == load_bundle(current).bundle_id


def assert_shadow_answers(db, expected_of) -> None:
    """Every recorded image has a shadow row holding the answer expected_of(recorded row) gives (an
    InspectionResult): label and Stage-1 score."""
    store = Store(db)
    try:
        shadows = {r["result_id"]: r for r in store.db.execute("SELECT * FROM shadow_results").fetchall()}
        recorded = rows(db)
        assert len(shadows) == len(recorded) > 0            # every image shadowed (fraction 1)
        for row in recorded:
            expected = expected_of(row)
            assert shadows[row["id"]]["label"] == expected.label
            assert shadows[row["id"]]["stage1_score"] == pytest.approx(expected.stage1_score, abs=1e-6)
    finally:
        store.close()


def test_a_shadowed_image_is_decoded_once_for_both_bundles(pair, folders, monkeypatch):
    """The candidate reads the current bundle's decode (the shadow's extra cost is its models, not a second
    decode), and its answer equals its own Inspector's on the same bytes."""
    import edge_runtime.inspector as insp_mod

    current, candidate = pair
    cfg = make_config(current, folders, shadow=str(candidate), threads=1)
    for i in range(4):
        (folders["watch"] / f"s{i}.png").write_bytes(png_bytes(100 + i))
    decodes = []
    real = insp_mod.decode_for
    monkeypatch.setattr(insp_mod, "decode_for", lambda *a, **k: decodes.append(a[1]) or real(*a, **k))
    assert WatchService(cfg).run(once=True) == 0
    assert len(decodes) == 4            # one per image, not one per bundle
    own = Inspector(candidate, threads=1)
    assert_shadow_answers(folders["db"], lambda row: own.inspect(png_bytes(100 + int(row["name"][1]))))


def _count_backbone_runs(monkeypatch) -> list:
    import edge_runtime.inspector as insp_mod

    runs = []
    real = insp_mod.StageRunner.run
    monkeypatch.setattr(insp_mod.StageRunner, "run", lambda self, px: runs.append(self.spec.sha256) or real(self, px))
    return runs


def test_a_backbone_both_bundles_have_runs_once_per_image(pair, folders, monkeypatch):
    """An adapted candidate has its parent's backbones (byte-identical): shadowing it runs each backbone once per
    image for both bundles (the candidate pays for its heads), and its answers are still its own Inspector's."""
    current, candidate = pair
    cfg = make_config(current, folders, shadow=str(candidate), threads=1)
    seeds = range(200, 206)
    for s in seeds:
        (folders["watch"] / f"b{s}.png").write_bytes(png_bytes(s))
    runs = _count_backbone_runs(monkeypatch)
    assert WatchService(cfg).run(once=True) == 0
    b = load_bundle(current)
    own_current, own_candidate = Inspector(current, threads=1), Inspector(candidate, threads=1)
    monkeypatch.undo()
    answers = [(own_current.inspect(png_bytes(s)), own_candidate.inspect(png_bytes(s))) for s in seeds]
    # Stage 1 once per image; Stage 2 once for each image that either bundle calls defective (not once per bundle)
    assert runs.count(b.stage1.sha256) == len(seeds)
    assert runs.count(b.stage2.sha256) == sum(cur.defect_class is not None or cand.defect_class is not None
                                              for cur, cand in answers)
    assert_shadow_answers(folders["db"], lambda row: answers[int(row["name"][1:].split(".")[0]) - seeds[0]][1])


def test_a_candidate_with_other_backbones_runs_its_own(folders, tmp_path, monkeypatch, tiny_bundle_v2):
    """A retrained candidate (other backbone files) gets no features from the current bundle: its shadow answers
    are its own Inspector's."""
    from tests.support.bundles import build_tiny_bundle_v2

    candidate = build_tiny_bundle_v2(tmp_path / "retrained", seed=7, replay_images=0)
    cfg = make_config(tiny_bundle_v2, folders, shadow=str(candidate), threads=1)
    seeds = range(300, 304)
    for s in seeds:
        (folders["watch"] / f"c{s}.png").write_bytes(png_bytes(s))
    runs = _count_backbone_runs(monkeypatch)
    assert WatchService(cfg).run(once=True) == 0
    monkeypatch.undo()
    assert runs.count(load_bundle(candidate).stage1.sha256) == len(seeds)
    own = Inspector(candidate, threads=1)
    assert_shadow_answers(folders["db"], lambda row: own.inspect(png_bytes(int(row["name"][1:].split(".")[0]))))
