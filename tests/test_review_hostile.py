"""`edge-inspect review` against a hostile network and a hostile processed folder, as a real process (issue 19):
DNS rebinding, deeply nested JSON, absurd dates, slow connections, and symbolic links swapped in while images
are served."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.support.hostile import proc_status, slow_clients
from tests.support.review import Client, make_review_site, start_review_cli


@pytest.fixture(scope="module")
def review(tmp_path_factory, tiny_bundle):
    """One site and one server for the module: no test here stores a review."""
    site = make_review_site(tmp_path_factory.mktemp("review") / "site", tiny_bundle)
    proc, url = start_review_cli(site["db"], "--allowed-hosts", "review.fab.example,10.0.0.7")
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    yield {**site, "proc": proc, "port": port, "client": Client(port)}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("host, status", [
    ("rebind.example:{port}", 421), ("evil.localhost:{port}", 421), ("127.0.0.1:{port}", 200),
    ("localhost:{port}", 200), ("review.fab.example:{port}", 200), ("10.0.0.7:{port}", 200),
    ("10.0.0.8:{port}", 421),
])
def test_only_bound_and_allowed_names_reach_the_page(review, host, status):
    """Before: any Host was served, and the Origin check compared Origin with http://{Host}, which a rebound
    name passes. Now the page, the API and reviews answer only the bound names and --allowed-hosts."""
    c, host = review["client"], host.format(port=review["port"])
    rid = review["ids"]["a"]
    # A review naming a review that does not exist: 409 once it reaches the handler, so nothing is stored here.
    stale = json.dumps({"label": "opens", "reviewer": "x", "expected_review_id": 99}).encode()
    for method, path, body in (("GET", "/", None), ("GET", "/api/queue?state=all", None),
                               ("POST", f"/api/results/{rid}/reviews", stale)):
        headers = {"Host": host, "Content-Type": "application/json", "Origin": f"http://{host}"}
        got, _, raw = c.raw(method, path, body, headers)
        assert got == (409 if status == 200 and method == "POST" else status), (host, path, raw)
        if status == 421:
            assert b"a.png" not in raw and "does not answer" in json.loads(raw)["error"]


@pytest.mark.parametrize("case", ["deep-array", "deep-object", "surrogate", "nan", "utf16"])
def test_hostile_json_bodies_are_400(review, case):
    """A 2,000-deep array gave 500 (RecursionError); now any body json_input refuses is a 400."""
    rid = review["ids"]["a"]
    body = {"deep-array": b"[" * 2000 + b"]" * 2000,
            "deep-object": b'{"label": ' * 1000 + b"1" + b"}" * 1000,
            "surrogate": b'{"label": "opens", "reviewer": "\\ud800", "expected_review_id": 0}',
            "nan": b'{"label": "opens", "reviewer": "x", "expected_review_id": NaN}',
            "utf16": json.dumps({"label": "opens", "reviewer": "x", "expected_review_id": 0}).encode("utf-16")}[case]
    status, reply = review["client"].post(f"/api/results/{rid}/reviews", body[:4096])
    assert status == 400, reply
    assert "not acceptable JSON" in reply["error"]
    assert review["client"].get(f"/api/results/{rid}")[1]["review"] is None


@pytest.mark.parametrize("query", ["to=9999-12-31", "from=9999-12-31", "from=0001-01-01", "to=0001-01-01"])
def test_absurd_dates_are_400(review, query):
    """to=9999-12-31 gave 500 (OverflowError computing the next day); dates outside 1970..9999-12-30 are 400."""
    status, reply = review["client"].get(f"/api/queue?{query}")
    assert status == 400 and "must lie between" in reply["error"], reply
    assert review["client"].get("/api/queue?to=9999-12-30")[0] == 200


def test_slow_connections_hold_no_thread(review):
    """30 slow connections: the review server's threads do not grow and the page still answers while they are
    held (a server held up by them would answer only once they end, over a minute: past the client's 30 s
    timeout)."""
    pid, port = review["proc"].pid, review["port"]
    review["client"].get("/api/meta")
    threads_idle = proc_status(pid)["Threads"]
    socks, stop = slow_clients(port, 30)
    try:
        for _ in range(5):
            assert review["client"].get("/api/queue")[0] == 200
            time.sleep(0.2)
        assert proc_status(pid)["Threads"] <= threads_idle
    finally:
        stop.set()
        for s in socks:
            s.close()


def test_image_symlink_swaps_never_serve_a_file_from_outside(review, tmp_path):
    """A thread swaps processed/a.png between the real image and a symbolic link to a secret outside while the
    image is requested over and over. Before: the path was checked, then opened again by name, and the secret
    was served (18 swaps in 1.3 s). Now the file is opened once without following links and served from that
    descriptor: only the image or a 403 ever comes back."""
    processed, c = review["processed"], review["client"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG SECRET " + os.urandom(64))
    image = processed / "a.png"
    real = image.read_bytes()
    stop = threading.Event()

    def swap():
        link, keep = processed / ".link", processed / ".real"
        while not stop.is_set():
            try:
                os.symlink(secret, link)
                os.replace(image, keep)
                os.replace(link, image)         # a.png -> secret
                os.replace(keep, image)         # a.png is the real file again
            except OSError:
                pass

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen, leaked = {}, 0
    try:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            status, _, body = c.raw("GET", f"/api/results/{review['ids']['a']}/image")
            seen[status] = seen.get(status, 0) + 1
            leaked += b"SECRET" in body
            assert status in (200, 403, 404), status
            assert status != 200 or body == real
    finally:
        stop.set()
        swapper.join(5)
    assert leaked == 0 and seen.get(200, 0) > 0, seen
