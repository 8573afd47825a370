"""`edge-inspect review`: the review records (queue, corrections, summary) and the HTTP server, over real
sockets: path traversal, unknown ids, bad labels and bodies, concurrent edits, the CLI as a subprocess."""
from __future__ import annotations

import io
import json
import signal
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.bundle import load_bundle
from edge_runtime.review.server import ReviewServer
from edge_runtime.review.reviews import ReviewError, Reviews, open_reviews
from edge_runtime.db.store import Store, utc_now
from tests.support.review import (MISSING, Client, add_result, db_rows, installed_board_config, make_review_site,
                                  png, start_review_cli)


# ---------------------------------------------------------------------------------------------------------
# a store with known results (tests.support.review)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path, tiny_bundle):
    return make_review_site(tmp_path / "site", tiny_bundle)


@pytest.fixture
def serve(site):
    servers = []

    def start(operator=None, processed=None):
        reviews = Reviews(Store(site["db"]), processed or site["processed"])
        server = ReviewServer(("127.0.0.1", 0), reviews, operator)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return Client(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
        server.reviews.store.close()


# ---------------------------------------------------------------------------------------------------------
# the queue and the summary
# ---------------------------------------------------------------------------------------------------------
def test_queue_order_flagged_then_stage1_margin_then_unknown(site, serve):
    c = serve()
    status, page = c.get("/api/queue")
    assert status == 200
    assert [i["id"] for i in page["items"]] == site["order"]
    assert page["total"] == 6          # the quarantined result is not reviewable
    # paging keeps the order
    _, first = c.get("/api/queue?limit=4")
    _, rest = c.get("/api/queue?limit=4&offset=4")
    assert [i["id"] for i in first["items"] + rest["items"]] == site["order"]


def test_queue_items_show_label_stage1_and_stage2_top3(site, serve):
    c = serve()
    _, page = c.get("/api/queue")
    items = {i["id"]: i for i in page["items"]}
    a = items[site["ids"]["a"]]
    assert a["label"] == a["model_label"] == "bridges" and a["flagged"] is True
    assert a["stage1_score"] == 0.9 and a["threshold"] == 0.5 and a["margin"] == pytest.approx(0.4)
    assert a["top3"] == [["bridges", 0.45], ["cracks", 0.33], ["opens", 0.22]] and a["top3_complete"]
    assert a["bundle_id"] == site["bundle_id"] and a["state"] == "unreviewed" and a["review"] is None
    clean = items[site["ids"]["d"]]
    assert clean["top3"] == [] and clean["label"] == "clean"
    legacy = items[site["ids"]["f"]]     # before Stage-2 probabilities and provenance were recorded
    assert legacy["top3"] == [["cracks", 0.7]] and legacy["top3_complete"] is False
    assert legacy["threshold"] is None and legacy["margin"] is None and legacy["bundle_id"] is None


def test_correction_goes_into_reviews_and_never_edits_results(site, serve):
    c = serve()
    rid = site["ids"]["b"]
    before = db_rows(site["db"], "SELECT * FROM results ORDER BY id")
    status, body = c.review(rid, "opens", reviewer="ann")
    assert status == 201
    assert body["item"]["label"] == "opens" and body["item"]["state"] == "corrected"
    assert db_rows(site["db"], "SELECT * FROM results ORDER BY id") == before
    [review] = db_rows(site["db"], "SELECT * FROM reviews")
    assert (review["result_id"], review["old_label"], review["new_label"], review["reviewer"], review["supersedes"]) \
        == (rid, "cracks", "opens", "ann", 0)
    assert review["reviewed_at"].startswith(utc_now()[:10])
    # it leaves the to-do queue and shows under its new state and label
    _, todo = c.get("/api/queue")
    assert rid not in [i["id"] for i in todo["items"]]
    _, corrected = c.get("/api/queue?state=corrected&label=opens")
    assert [i["id"] for i in corrected["items"]] == [rid]
    # the summary counts it
    _, s = c.get("/api/summary")
    assert s["states"] == {"unreviewed": 5, "confirmed": 0, "corrected": 1, "unusable": 0}
    assert s["corrections"] == [{"from": "cracks", "to": "opens", "count": 1}]
    assert s["per_label"]["cracks"]["corrected_from"] == 1 and s["per_label"]["opens"]["corrected_to"] == 1
    assert s["per_label"]["opens"]["current"] == 2 and s["per_label"]["cracks"]["current"] == 1
    assert s["bundles"][site["bundle_id"]]["model_accuracy"] == 0.0


def test_confirm_unusable_and_a_second_review_chain(site, serve):
    c = serve()
    a, e = site["ids"]["a"], site["ids"]["e"]
    assert c.review(a, "bridges")[0] == 201                      # the model's label: confirmed
    status, body = c.review(e, "unusable")
    assert status == 201 and body["item"]["state"] == "unusable"
    status, body = c.review(e, "clean", reviewer="bob", expected=body["review"]["id"])   # changes their mind
    assert status == 201 and body["item"]["state"] == "corrected" and body["item"]["label"] == "clean"
    chain = db_rows(site["db"], "SELECT supersedes, old_label, new_label, reviewer FROM reviews WHERE result_id = ? "
                                "ORDER BY id", (e,))
    first = db_rows(site["db"], "SELECT id FROM reviews WHERE result_id = ?", (e,))[0]["id"]
    assert chain == [{"supersedes": 0, "old_label": "bridges", "new_label": "unusable", "reviewer": "ann"},
                     {"supersedes": first, "old_label": "unusable", "new_label": "clean", "reviewer": "bob"}]
    _, s = c.get("/api/summary")
    assert s["states"] == {"unreviewed": 4, "confirmed": 1, "corrected": 1, "unusable": 0}
    assert s["reviews"] == 3
    assert s["bundles"][site["bundle_id"]]["model_accuracy"] == 0.5
    _, confirmed = c.get("/api/queue?state=confirmed")
    assert [i["id"] for i in confirmed["items"]] == [a]
    _, reviewed = c.get("/api/queue?state=reviewed")
    assert sorted(i["id"] for i in reviewed["items"]) == sorted([a, e])


def test_filters_by_label_date_and_state(site, serve):
    c = serve()
    ids = site["ids"]
    _, page = c.get("/api/queue?label=bridges")
    assert [i["id"] for i in page["items"]] == [ids["a"], ids["e"]]
    _, page = c.get("/api/queue?from=2026-11-03&to=2026-11-03")      # one UTC day, both ends included
    assert [i["id"] for i in page["items"]] == [ids["c"], ids["d"]]
    _, page = c.get("/api/queue?from=2026-11-04")
    assert [i["id"] for i in page["items"]] == [ids["e"], ids["f"]]
    _, page = c.get("/api/queue?to=2026-11-01&state=all")
    assert [i["id"] for i in page["items"]] == [ids["a"]]
    _, page = c.get("/api/queue?label=&from=&to=&state=unreviewed")  # empty filter fields: any
    assert len(page["items"]) == 6


# ---------------------------------------------------------------------------------------------------------
# HTTP-level refusals
# ---------------------------------------------------------------------------------------------------------
SECRET = b"top secret, outside processed/"


@pytest.mark.parametrize("path", [
    "/../../../../etc/passwd", "/../results.sqlite3", "/review.js/../../secret.txt", "/%2e%2e/%2e%2e/etc/passwd",
    "/api/results/1/image/../../../secret.txt", "/api/results/..%2F..%2Fsecret.txt/image",
    "/api/results/1%2F..%2F..%2Fsecret.txt/image", "/static/../secret.txt", "//etc/passwd", "/api/../secret.txt",
])
def test_url_path_traversal_never_reaches_a_file(site, serve, path):
    (site["root"] / "secret.txt").write_bytes(SECRET)
    c = serve()
    status, headers, body = c.raw("GET", path)
    assert status in (400, 404), (path, status)
    assert SECRET not in body and b"root:" not in body and b"SQLite" not in body
    assert headers["Content-Type"].startswith("application/json") and "error" in json.loads(body)


def test_images_only_from_inside_processed(site, serve, tmp_path):
    processed, root = site["processed"], site["root"]
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(99))
    store = Store(site["db"])
    dotdot = add_result(store, processed, "dotdot.png", label="opens", score=0.7, dest=processed / ".." / "dd.png",
                        bundle_id=site["bundle_id"], seed=98)
    (processed / "escape.png").symlink_to(outside)
    escape = add_result(store, processed, "escape.png", label="opens", score=0.7, bundle_id=site["bundle_id"])
    absolute = add_result(store, processed, "abs.png", label="opens", score=0.7, dest=outside,
                          bundle_id=site["bundle_id"])
    (processed / "inner.png").symlink_to(processed / "a.png")
    inner = add_result(store, processed, "inner.png", label="opens", score=0.7, bundle_id=site["bundle_id"])
    missing = add_result(store, processed, "gone.png", label="opens", score=0.7, bundle_id=site["bundle_id"])
    (processed / "gone.png").unlink()
    store.close()
    assert (root / "dd.png").is_file()       # it exists: refused for where it is, not because it is absent
    c = serve()
    # A symbolic link is never followed, even one that stays inside: what it points to can change between any
    # check and the open (test_image_symlink_swaps_never_serve_a_file_from_outside).
    for rid in (dotdot, escape, absolute, inner):
        status, headers, body = c.raw("GET", f"/api/results/{rid}/image")
        assert status == 403, rid
        assert not body.startswith(b"\x89PNG") and "outside the processed folder" in json.loads(body)["error"]
    status, _, body = c.raw("GET", f"/api/results/{missing}/image")
    assert status == 404 and "missing" in json.loads(body)["error"]
    status, headers, body = c.raw("GET", f"/api/results/{site['ids']['a']}/image")
    assert status == 200 and body == (processed / "a.png").read_bytes()
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_tiff_is_sent_as_png(site, serve):
    store = Store(site["db"])
    tif = site["processed"] / "scan.tif"
    Image.fromarray(np.full((20, 30), 77, np.uint8)).save(tif)
    rid = add_result(store, site["processed"], "scan.tif", label="opens", score=0.7, bundle_id=site["bundle_id"])
    store.close()
    status, headers, body = serve().raw("GET", f"/api/results/{rid}/image")
    assert status == 200 and headers["Content-Type"] == "image/png"
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG" and img.size == (30, 20) and np.asarray(img).max() == 77


def test_unknown_and_malformed_ids(site, serve):
    c = serve()
    quarantined = site["ids"]["q"]
    for path in ("/api/results/999", "/api/results/999/image", f"/api/results/{quarantined}",
                 f"/api/results/{quarantined}/image"):
        status, body = c.get(path)
        assert status == 404 and "no inspected result" in body["error"], path
    for raw in ("abc", "0", "-1", "1.5", "01", "1e3", "99999999999999999999"):
        status, body = c.get(f"/api/results/{raw}")
        assert status == 400 and "positive integer" in body["error"], raw
    assert c.review(999, "clean")[0] == 404
    assert c.review(quarantined, "clean")[0] == 404
    status, body = c.get("/api/nothing-here")
    assert status == 404
    assert db_rows(site["db"], "SELECT * FROM reviews") == []


@pytest.mark.parametrize("label", ["dirt", "", None, 3, "Clean", "unusable ", ["opens"], "defective"])
def test_bad_labels_are_refused(site, serve, label):
    status, body = serve().review(site["ids"]["a"], label)
    assert status == 400 and "unknown label" in body["error"]
    assert db_rows(site["db"], "SELECT * FROM reviews") == []


@pytest.mark.parametrize("case", ["no reviewer", "blank reviewer", "control char", "too long", "reviewer number",
                                  "no expected", "negative expected", "text expected", "bool expected",
                                  "unknown field", "not json", "json list", "form post", "too big",
                                  "cross origin", "not utf-8"])
def test_bad_review_requests_are_refused_and_store_nothing(site, serve, case):
    c = serve()
    rid = site["ids"]["a"]
    path = f"/api/results/{rid}/reviews"
    expect = 400
    if case == "no reviewer":
        status, body = c.review(rid, "opens", reviewer=MISSING)
    elif case == "blank reviewer":
        status, body = c.review(rid, "opens", reviewer="   ")
    elif case == "control char":
        status, body = c.review(rid, "opens", reviewer="ann\x1b[2J")
    elif case == "too long":
        status, body = c.review(rid, "opens", reviewer="a" * 65)
    elif case == "reviewer number":
        status, body = c.review(rid, "opens", reviewer=7)
    elif case == "no expected":
        status, body = c.review(rid, "opens", expected=MISSING)
    elif case == "negative expected":
        status, body = c.review(rid, "opens", expected=-1)
    elif case == "text expected":
        status, body = c.review(rid, "opens", expected="0")
    elif case == "bool expected":
        status, body = c.review(rid, "opens", expected=False)
    elif case == "unknown field":
        status, body = c.review(rid, "opens", label_id=5)
    elif case == "not json":
        status, body = c.post(path, b"label=opens")
    elif case == "json list":
        status, body = c.post(path, b'["opens"]')
    elif case == "form post":
        status, body = c.post(path, b'{"label": "opens", "reviewer": "x", "expected_review_id": 0}',
                              ctype="application/x-www-form-urlencoded")
        expect = 415
    elif case == "too big":
        status, body = c.review(rid, "opens", reviewer="x" * 5000)
        expect = 413
    elif case == "cross origin":
        status, body = c.post(path, b'{"label": "opens", "reviewer": "x", "expected_review_id": 0}',
                              headers={"Origin": "http://evil.example"})
        expect = 403
    else:
        status, body = c.post(path, b'{"label": "opens", "reviewer": "\xff", "expected_review_id": 0}')
    assert status == expect, (case, body)
    assert body["error"]
    assert db_rows(site["db"], "SELECT * FROM reviews") == []


def test_bad_queue_parameters(site, serve):
    c = serve()
    for query in ("state=bogus", "label=dirt", "from=2026-13-01", "to=yesterday", "limit=0", "limit=501",
                  "limit=abc", "offset=-1", "sort=id", "state=all&state=unreviewed"):
        status, body = c.get(f"/api/queue?{query}")
        assert status == 400 and body["error"], query


def test_other_methods_are_refused(site, serve):
    c = serve()
    for method in ("PUT", "DELETE", "PATCH"):
        status, _, body = c.raw(method, f"/api/results/{site['ids']['a']}/reviews", b"{}")
        assert status == 405 and json.loads(body)["error"]


# ---------------------------------------------------------------------------------------------------------
# concurrent edits: optimistic, the request names the review it saw
# ---------------------------------------------------------------------------------------------------------
def test_a_stale_review_gets_409_with_the_review_now_in_force(site, serve):
    c = serve()
    rid = site["ids"]["c"]
    status, first = c.review(rid, "bridges", reviewer="ann", expected=0)
    assert status == 201
    status, body = c.review(rid, "cracks", reviewer="bob", expected=0)     # bob looked before ann saved
    assert status == 409
    assert body["current"]["id"] == first["review"]["id"] and body["current"]["reviewer"] == "ann"
    assert body["item"]["label"] == "bridges"
    status, body = c.review(rid, "cracks", reviewer="bob", expected=first["review"]["id"])   # bob, informed
    assert status == 201 and body["review"]["old_label"] == "bridges"
    assert c.review(rid, "opens", reviewer="ann", expected=first["review"]["id"])[0] == 409   # ann again stale
    assert [r["new_label"] for r in db_rows(site["db"], "SELECT new_label FROM reviews ORDER BY id")] == \
        ["bridges", "cracks"]


def test_simultaneous_edits_one_wins_one_gets_409(site, serve):
    """Two operators press at the same moment on each result, through two servers on one database (two
    processes' worth of connections): exactly one review per result lands."""
    clients = [serve(), serve()]
    for rid in site["order"]:
        barrier = threading.Barrier(2)
        results = []

        def press(client, who):
            barrier.wait()
            results.append(client.review(rid, "opens", reviewer=who, expected=0)[0])
        threads = [threading.Thread(target=press, args=(cl, w)) for cl, w in zip(clients, ("ann", "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [201, 409], rid
    counts = db_rows(site["db"], "SELECT result_id, count(*) AS n FROM reviews GROUP BY result_id")
    assert sorted(r["result_id"] for r in counts) == sorted(site["order"]) and {r["n"] for r in counts} == {1}


def test_database_refuses_a_forked_review_history(site):
    store = Store(site["db"])
    rid = site["ids"]["a"]
    insert = ("INSERT INTO reviews (result_id, supersedes, old_label, new_label, reviewer, reviewed_at) "
              "VALUES (?, 0, 'bridges', ?, 'x', '2026-11-28')")
    store.db.execute(insert, (rid, "opens"))
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute(insert, (rid, "cracks"))
    store.close()


def test_operator_default_is_recorded_when_the_page_sends_none(site, serve):
    c = serve(operator="night shift")
    status, body = c.review(site["ids"]["a"], "opens", reviewer=MISSING)
    assert status == 201 and body["review"]["reviewer"] == "night shift"
    _, meta = c.get("/api/meta")
    assert meta["operator"] == "night shift"
    assert meta["labels"] == ["clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other",
                              "unusable"]


def test_page_files_are_served_with_a_strict_policy(site, serve):
    c = serve()
    status, headers, body = c.raw("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/review.js"' in body and b'href="/review.css"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for path, ctype in (("/review.js", "text/javascript"), ("/review.css", "text/css")):
        status, headers, body = c.raw("GET", path)
        assert status == 200 and headers["Content-Type"].startswith(ctype) and len(body) > 1000


def test_a_database_without_bundles_needs_the_class_list(tmp_path, tiny_bundle):
    processed = tmp_path / "processed"
    processed.mkdir()
    store = Store(tmp_path / "old.sqlite3")
    add_result(store, processed, "x.png", label="opens", score=0.7, confidence=0.6)
    store.close()
    with pytest.raises(ReviewError, match="--models BUNDLE"):
        open_reviews(tmp_path / "old.sqlite3")
    reviews = open_reviews(tmp_path / "old.sqlite3", models=tiny_bundle)
    assert reviews.labels[-1] == "unusable" and reviews.taxonomy[0] == "clean"
    assert [i["label"] for i in reviews.queue()["items"]] == ["opens"]
    reviews.store.close()


# ---------------------------------------------------------------------------------------------------------
# the command line, as a real process
# ---------------------------------------------------------------------------------------------------------
def test_cli_serves_the_page_and_stops_on_sigterm(site):
    proc, url = start_review_cli(site["db"], "--operator", "day shift")
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        c = Client(port)
        status, headers, body = c.raw("GET", "/")
        assert status == 200 and b"sem-inspect review" in body
        status, meta = c.get("/api/meta")
        assert meta["operator"] == "day shift" and meta["bundles"][0]["id"] == site["bundle_id"]
        assert c.review(site["ids"]["a"], "opens", reviewer=MISSING)[0] == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert db_rows(site["db"], "SELECT reviewer FROM reviews") == [{"reviewer": "day shift"}]


def test_cli_setup_errors(tmp_path, site, capsys):
    from edge_runtime.cli import main
    missing = tmp_path / "nope.sqlite3"
    assert main(["review", "--db", str(missing)]) == 2
    assert "no such result database" in capsys.readouterr().err and not missing.exists()
    assert main(["review", "--db", str(site["db"]), "--processed", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["review", "--db", str(site["db"]), "--http", "localhost"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["review", "--db", str(site["db"]), "--operator", "\x07"]) == 2
    assert "control characters" in capsys.readouterr().err


def test_cli_takes_the_database_and_processed_folder_from_the_service_config(tmp_path, tiny_bundle, capsys):
    """On an installed board (deploy/service.yaml: db in db/, processed elsewhere) `--config` is all it takes;
    without it the default beside the database does not exist; an explicit --processed wins over the config."""
    from edge_runtime.cli import main
    from edge_runtime.config.service_config import load_service_config

    config = installed_board_config(tmp_path, tiny_bundle)
    cfg = load_service_config(config)
    processed = Path(cfg.processed)
    store = Store(cfg.db)
    bundle = load_bundle(tiny_bundle)
    store.register_bundle(bundle)
    rid = add_result(store, processed, "a.png", label="bridges", score=0.9, bundle_id=bundle.bundle_id, seed=1)
    store.close()
    proc, url = start_review_cli(None, "--config", str(config))
    try:
        status, _, body = Client(int(url.rstrip("/").rsplit(":", 1)[1])).raw("GET", f"/api/results/{rid}/image")
        assert status == 200 and body == (processed / "a.png").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert main(["review", "--db", cfg.db]) == 2
    assert "--processed" in capsys.readouterr().err
    assert main(["review", "--config", str(config), "--processed", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none'} does not exist" in capsys.readouterr().err
    assert main(["review", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: service config file not found" in capsys.readouterr().err
    assert main(["review"]) == 2
    err = capsys.readouterr().err
    assert "--config FILE" in err and "--db PATH" in err
