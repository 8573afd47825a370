"""The central read API (python -m central.api) over a collector database filled through the real
storage (add_results of parsed board messages), on SQLite and on a real PostgreSQL server (skipped with the reason
where none can start): boards with their bundle state, counts per grouping against counts computed here, filters,
paging without gaps or repeats, the hardening (token, Host, Origin, methods, hostile parameters) and that the API
cannot write."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from urllib.parse import urlencode

import pytest

from central import queries
from central.api import CentralApi
from edge_runtime.fleet.messages import parse_bundle_state, parse_result
from central.storage import StorageError, open_storage
from tests.support.messages import valid_result
from tests.support.paths import REPO

TOKEN = "central-s3cret"
BOARDS = ("tool-01", "tool-02", "tool-03")
BUNDLES = ("a" * 64, "b" * 64)
N = 240
# few distinct times, some with offsets: many ties (paging must order them) and days that differ from local ones
TIMES = [f"2026-12-0{d}T{h}:30:00{z}" for d in (1, 2, 3) for h in ("00", "23") for z in ("+00:00", "+09:00", "-05:00")]


def messages() -> list[dict]:
    rng = random.Random(21)
    out = []
    for i in range(1, N + 1):
        board = BOARDS[i % len(BOARDS)]
        msg = valid_result(board, i, rng)
        msg["recorded_at"] = rng.choice(TIMES)
        msg["bundle_id"] = BUNDLES[rng.random() < 0.3]
        out.append(msg)
    return out


STATUS = json.dumps({"status": "online", "board": "tool-01", "bundle": {
    "current": BUNDLES[0], "candidate": BUNDLES[1], "phase": "shadow",
    "shadow": {"images": 40, "agreement": 0.95, "stage1_agreement": 0.97, "error_rate": 0.0},
    "last_change": {"at": "2026-12-02T09:00:00.000+00:00", "what": "candidate", "why": "operator"}}}).encode()


def fill(db: str) -> None:
    storage = open_storage(db)
    try:
        batch = [parse_result(m["board"], json.dumps(m).encode()) for m in messages()]
        assert storage.add_results(batch[:100]) == ["stored"] * 100
        assert storage.add_results(batch[100:]) == ["stored"] * (N - 100)
        storage.set_status("tool-01", "online")
        storage.set_bundle_state("tool-01", parse_bundle_state(STATUS))
        storage.set_status("tool-02", "offline")
        storage.set_status("tool-04", "online")         # a board that has sent no result yet
    finally:
        storage.close()


def utc(when: str) -> dt.datetime:
    return dt.datetime.fromisoformat(when).astimezone(dt.timezone.utc)


class Api:
    """The API server in a thread, over a read-only reader of `db`."""

    def __init__(self, db: str, **kw):
        self.reader = queries.open_reader(db)
        self.server = CentralApi(("127.0.0.1", 0), self.reader, TOKEN, **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def get(self, path: str, token: str | None = TOKEN, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None) -> tuple[int, dict, object]:
        con = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1], timeout=10)
        try:
            hdrs = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
            con.request(method, path, body=body, headers=hdrs)
            resp = con.getresponse()
            raw = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
        finally:
            con.close()

    def ok(self, path: str, **params) -> dict:
        status, _, doc = self.get(path + ("?" + urlencode(params) if params else ""))
        assert status == 200, doc
        return doc

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.reader.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request, tmp_path_factory) -> str:
    if request.param == "sqlite":
        path = str(tmp_path_factory.mktemp("central") / "central.sqlite3")
    else:
        path = request.getfixturevalue("postgres_server").create_database()
    fill(path)
    return path


@pytest.fixture(scope="module")
def api(db):
    server = Api(db)
    yield server
    server.close()


def test_boards_with_status_bundle_state_and_counts(api):
    doc = api.ok("/boards")
    by_board = {b["board"]: b for b in doc["boards"]}
    assert [b["board"] for b in doc["boards"]] == ["tool-01", "tool-02", "tool-03", "tool-04"]
    msgs = messages()
    for board in BOARDS:
        mine = [m for m in msgs if m["board"] == board]
        assert by_board[board]["results"] == len(mine)
        assert utc(by_board[board]["last_recorded_at"]) == max(utc(m["recorded_at"]) for m in mine)
    assert by_board["tool-01"]["status"] == "online" and by_board["tool-02"]["status"] == "offline"
    assert by_board["tool-03"]["status"] is None and by_board["tool-03"]["bundle"] is None
    assert by_board["tool-04"] == {**by_board["tool-04"], "results": 0, "last_recorded_at": None,
                                   "status": "online"}
    bundle = by_board["tool-01"]["bundle"]
    assert bundle["current"] == BUNDLES[0] and bundle["candidate"] == BUNDLES[1] and bundle["phase"] == "shadow"
    assert bundle["agreement"] == 0.95 and bundle["shadow_images"] == 40
    assert bundle["last_change"] == "candidate: operator" and bundle["reported_at"]


def expected_counts(by: tuple[str, ...], keep=lambda m: True) -> dict:
    key = {"board": lambda m: m["board"], "label": lambda m: m["label"], "outcome": lambda m: m["outcome"],
           "bundle_id": lambda m: m["bundle_id"], "day": lambda m: utc(m["recorded_at"]).date().isoformat()}
    return dict(Counter(tuple(key[k](m) for k in by) for m in messages() if keep(m)))


def got_counts(doc: dict) -> dict:
    assert doc["truncated"] is False
    return {tuple(row[k] for k in doc["by"]): row["results"] for row in doc["counts"]}


@pytest.mark.parametrize("by", [(), ("board",), ("label",), ("day",), ("bundle_id",), ("outcome",),
                                ("board", "label", "day"), ("day", "bundle_id")])
def test_counts_per_grouping_match_the_data(api, by):
    doc = api.ok("/counts", **({"by": ",".join(by)} if by else {}))
    assert doc["by"] == list(by)
    assert got_counts(doc) == expected_counts(by)
    if "label" not in by:               # no nulls (their place differs between back-ends): ordered by the groups
        assert list(got_counts(doc)) == sorted(got_counts(doc))


def test_counts_with_filters(api):
    since, until = "2026-12-02", "2026-12-03T09:00:00+09:00"      # 2026-12-03T00:00Z
    lo, hi = utc("2026-12-02T00:00:00+00:00"), utc(until)
    doc = api.ok("/counts", by="label,day", board="tool-02", since=since, until=until, bundle_id=BUNDLES[1])
    assert got_counts(doc) == expected_counts(
        ("label", "day"), lambda m: m["board"] == "tool-02" and lo <= utc(m["recorded_at"]) < hi
        and m["bundle_id"] == BUNDLES[1])
    assert got_counts(doc)                  # the filter leaves something to count
    doc = api.ok("/counts", by="board", label="clean", outcome="inspected")
    assert got_counts(doc) == expected_counts(("board",), lambda m: m["label"] == "clean")


def page_through(api, limit: int, **filters) -> list[tuple]:
    seen, cursor, pages = [], None, 0
    while True:
        params = {**filters, "limit": limit, **({"before": cursor} if cursor else {})}
        doc = api.ok("/results", **params)
        assert len(doc["results"]) <= limit
        seen += [(r["board"], r["id"]) for r in doc["results"]]
        pages += 1
        cursor = doc["next"]
        if cursor is None:
            return seen
        assert len(doc["results"]) == limit and pages < 1000


def newest_first(keep=lambda m: True) -> list[tuple]:
    rows = [m for m in messages() if keep(m)]
    rows.sort(key=lambda m: (utc(m["recorded_at"]), m["board"], m["id"]), reverse=True)
    return [(m["board"], m["id"]) for m in rows]


@pytest.mark.parametrize("limit", [7, 100, 1000])
def test_results_page_newest_first_without_gaps_or_repeats(api, limit):
    assert page_through(api, limit) == newest_first()


def test_results_filters(api):
    got = page_through(api, 9, board="tool-03", review="true")
    assert got == newest_first(lambda m: m["board"] == "tool-03" and m["review"] is True) and got
    got = page_through(api, 50, outcome="quarantined", since="2026-12-01T20:00:00-05:00")
    assert got == newest_first(lambda m: m["outcome"] == "quarantined" and
                               utc(m["recorded_at"]) >= utc("2026-12-02T01:00:00+00:00")) and got
    got = page_through(api, 50, label="cracks", bundle_id=BUNDLES[0], until="2026-12-02T23:30:00Z")
    assert got == newest_first(lambda m: m["label"] == "cracks" and m["bundle_id"] == BUNDLES[0] and
                               utc(m["recorded_at"]) < utc("2026-12-02T23:30:00+00:00")) and got
    row = api.ok("/results", limit=1)["results"][0]
    msg = next(m for m in messages() if (m["board"], m["id"]) == (row["board"], row["id"]))
    assert {k: row[k] for k in ("label", "outcome", "review", "confidence", "bundle_id", "sha256")} == \
        {k: msg[k] for k in ("label", "outcome", "review", "confidence", "bundle_id", "sha256")}
    assert utc(row["recorded_at"]) == utc(msg["recorded_at"])


@pytest.mark.parametrize("query, names", [
    ("limit=1001", "limit"), ("limit=0", "limit"), ("limit=-1", "limit"), ("limit=10**9", "limit"),
    ("limit=99999999999999999999", "limit"), ("since=yesterday", "since"), ("until=2026-13-01", "until"),
    ("since=2026-12-02T10:00:00+00:00", "since"),     # an unencoded + is a space: refused, not misread
    ("board=tool-01'--", "board"), ("bundle_id=abc", "bundle_id"), ("outcome=all", "outcome"),
    ("review=maybe", "review"), ("before=xyz", "before"), ("before=" + "A" * 500, "before"),
    ("before=WyIyMDI2IiwidG9vbC0wMSIsMV0", "before"), ("label=", "label"), ("label=" + "x" * 101, "label"),
    ("sort=id", "sort"), ("limit=1&limit=2", "limit"), ("board=%ff", "UTF-8"),
    ("label=a%00b", "label"), ("label=clean%0d%0a", "label"),     # a NUL reaches no database: 400, not 503
])
def test_bad_parameters_get_400_naming_them(api, query, names):
    status, _, doc = api.get("/results?" + query)
    assert status == 400 and names in doc["error"], doc


@pytest.mark.parametrize("query, names", [("by=lable", "by"), ("by=label,label", "by"), ("by=", "by"),
                                          ("by=label;DROP%20TABLE%20fleet_results", "by"), ("limit=5", "limit"),
                                          ("by=recorded_at", "by")])
def test_counts_bad_parameters(api, query, names):
    status, _, doc = api.get("/counts?" + query)
    assert status == 400 and names in doc["error"], doc


def test_sql_in_a_filter_value_stays_a_value(api):
    for value in ("clean' OR '1'='1", "clean\" OR \"1\"=\"1", "x'; DELETE FROM fleet_results; --", "%", "?", "_"):
        assert api.ok("/results", label=value)["results"] == []
        assert got_counts(api.ok("/counts", by="board", label=value)) == {}
    assert len(page_through(api, 1000)) == N          # nothing was deleted


def test_token_host_origin_and_methods(api):
    assert api.get("/healthz", token=None)[0] == 200
    for path in ("/boards", "/counts", "/results", "/nowhere"):
        status, headers, doc = api.get(path, token=None)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", doc
        assert api.get(path, token=TOKEN + "x")[0] == 401
    assert api.get("/nowhere")[0] == 404
    status, _, doc = api.get("/boards", headers={"Host": "evil.example"})
    assert status == 421 and "Host" in doc["error"]
    status, _, doc = api.get("/boards", headers={"Origin": "http://evil.example"})
    assert status == 403
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, _, doc = api.get("/results", method=method, body=b'{"id": 1}')
        assert status == 405 and method in doc["error"]
    status, headers, body = api.get("/boards", method="HEAD")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 10
    with socket.create_connection(("127.0.0.1", api.server.server_address[1]), timeout=10) as sock:
        sock.sendall(f"HEAD /boards HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        raw = b"".join(iter(lambda: sock.recv(65536), b""))
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\n")      # the headers alone


def test_healthz_reports_the_database(api):
    status, _, doc = api.get("/healthz", token=None)
    assert status == 200 and doc["ok"] is True and doc["database"] is True and doc["schema_version"] >= 1


def test_the_reader_cannot_write(db):
    reader = queries.open_reader(db)
    try:
        for sql in ("INSERT INTO fleet_boards VALUES ('x', 'online', 'now')", "DELETE FROM fleet_results",
                    "CREATE TABLE t (a INTEGER)", "UPDATE fleet_results SET label = 'x'"):
            with pytest.raises(StorageError, match="(?i)read.only|readonly"):
                reader.query(sql)
        assert reader.query("SELECT count(*) AS n FROM fleet_results")[0]["n"] == N
    finally:
        reader.close()


def test_sqlite_file_unchanged_by_the_api(tmp_path):
    path = tmp_path / "central.sqlite3"
    fill(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    api = Api(str(path))
    try:
        api.ok("/boards"), api.ok("/counts", by="board,label,day"), page_through(api, 50)
    finally:
        api.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_sqlite_reads_what_a_running_collector_commits(tmp_path):
    path = str(tmp_path / "central.sqlite3")
    fill(path)
    storage = open_storage(path)            # the collector, still running
    api = Api(path)
    try:
        assert api.ok("/counts")["counts"] == [{"results": N}]
        msg = {**messages()[0], "id": N + 1, "recorded_at": "2026-12-05T00:00:00Z"}
        assert storage.add_results([parse_result(msg["board"], json.dumps(msg).encode())]) == ["stored"]
        assert api.ok("/counts")["counts"] == [{"results": N + 1}]
        assert api.ok("/results", limit=1)["results"][0]["id"] == N + 1
    finally:
        api.close()
        storage.close()


HEAVY = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) "
         "SELECT count(*) AS n FROM c")


def test_a_long_query_is_cancelled(db, monkeypatch):
    monkeypatch.setattr(queries, "QUERY_TIMEOUT_S", 0.2)
    reader = queries.open_reader(db)
    try:
        # cancelled by its deadline (a query left to run would return its count instead)
        with pytest.raises(StorageError, match=r"query over 0\.2 s: narrow the filters"):
            reader.query(HEAVY)
        assert reader.query("SELECT count(*) AS n FROM fleet_results")[0]["n"] == N     # and it goes on
    finally:
        reader.close()


def test_postgres_without_psycopg_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StorageError, match=r'pip install "sem-inspect\[central\]"') as err:
        queries.open_reader("postgresql://nobody@127.0.0.1:1/none")
    assert "\n" not in str(err.value)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "central.api", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def test_cli_refuses_what_it_cannot_serve_and_creates_nothing(tmp_path):
    missing = tmp_path / "missing.sqlite3"
    proc = run_cli("--db", str(missing), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "no such database file" in proc.stderr and not missing.exists()
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    proc = run_cli("--db", str(empty), "--listen", "127.0.0.1:0")
    assert proc.returncode == 2 and "not a collector database" in proc.stderr and empty.stat().st_size == 0
    assert sqlite3.connect(empty).execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    proc = run_cli("--db", str(empty), "--listen", "nowhere")
    assert proc.returncode == 2 and "--listen" in proc.stderr
    proc = run_cli("--db", str(empty), "--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "none"))
    assert proc.returncode == 2 and "--token-file" in proc.stderr
    assert proc.stderr.count("\n") == 1         # one line


def test_cli_serves_with_the_token_from_a_file(tmp_path):
    path = tmp_path / "central.sqlite3"
    fill(str(path))
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "central.api", "--db", str(path), "--listen",
                             "127.0.0.1:0", "--token-file", str(tmp_path / "token"), "--allowed-hosts",
                             "central.fab.local"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stderr.readline()
        assert "serving http://127.0.0.1:" in line and TOKEN not in line, line
        port = int(line.split("serving http://127.0.0.1:")[1].split()[0])
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        con.request("GET", "/counts", headers={"Authorization": f"Bearer {TOKEN}", "Host": "central.fab.local"})
        resp = con.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["counts"] == [{"results": N}]
        con.request("GET", "/counts", headers={"Host": "central.fab.local"})
        resp = con.getresponse()
        assert resp.status == 401
        resp.read()
        con.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        rest = proc.stderr.read()
    assert rc == 0 and TOKEN not in rest


def test_postgres_session_is_read_only_and_survives_a_restart(postgres_server):
    url = postgres_server.create_database()
    fill(url)
    api = Api(url)
    try:
        for _ in range(3 * api.server.limits.workers):      # every worker thread holds a connection
            api.ok("/boards")
        assert api.reader.query("SHOW default_transaction_read_only")[0]["default_transaction_read_only"] == "on"
        assert len(page_through(api, 1000)) == N
        postgres_server.restart()
        # every worker's connection was lost in the restart: each reconnects and answers
        assert [api.get("/results?limit=5")[0] for _ in range(3 * api.server.limits.workers)] == \
            [200] * (3 * api.server.limits.workers)
        assert len(page_through(api, 1000)) == N
        postgres_server.stop(remove=False)
        try:
            status, _, doc = api.get("/results?limit=5")
            assert status == 503 and "PostgreSQL" in doc["error"]      # down: 503, never a 500
            status, _, doc = api.get("/healthz", token=None)
            assert status == 503 and doc["ok"] is False and doc["database"] is False
        finally:
            postgres_server.start()
        assert api.get("/healthz", token=None)[0] == 200
    finally:
        api.close()
