"""The collector's storage on both back-ends (central/storage.py: SQLite, postgres.py: PostgreSQL on
a real server the tests start themselves, benchmarks/pgserver.py): batches with duplicates and conflicts, dead
letters with hostile bytes, status and bundle state, the schema version and its migration from the first
collector's SQLite file, the indexes, read-only queries, schema creation by two collectors at once, a server
restart between batches, a failed batch leaving nothing behind, and the missing-psycopg error."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import threading

import pytest

from central import postgres, rows, storage
from edge_runtime.fleet.messages import parse_bundle_state, parse_result
from central.storage import (CONFLICT, DUPLICATE, KEEP_BYTES, STORED, StorageError, open_storage)
from tests.support.postgres import start_postgres
from tests.support.waiting import wait_until

BUNDLE = "ab" * 32


def result(rid: int, board: str = "board-a", **changes):
    msg = {"id": rid, "board": board, "outcome": "inspected", "name": f"img{rid}.png", "label": "bridges",
           "stage1_score": 0.75, "defect_class": "bridges", "confidence": 0.875, "review": False,
           "sha256": "cd" * 32, "bundle_id": BUNDLE, "recorded_at": "2026-12-02T12:00:00.125+00:00",
           "latency_ms": 12.5, **changes}
    return parse_result(board, json.dumps(msg).encode())


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh database of each back-end: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "central.sqlite3")
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def store(db):
    s = open_storage(db)
    yield s
    s.close()


def test_a_batch_stores_each_key_once_and_keeps_conflicts_apart(store):
    assert store.add_results([result(1), result(2), result(1), result(2, name="other.png"), result(3)]) == \
        [STORED, STORED, DUPLICATE, CONFLICT, STORED]
    # across batches; the same JSON with other key order and spacing is a duplicate
    same = parse_result("board-a", json.dumps(dict(reversed(list(result(3).message.items()))), indent=1).encode())
    assert store.add_results([same, result(1, label="opens", defect_class="opens"), result(4)]) == \
        [DUPLICATE, CONFLICT, STORED]
    assert store.add_result(result(4)) == DUPLICATE
    assert store.add_results([]) == []
    assert store.counts() == {"results": 4, "boards": 0, "dead_letters": 0, "conflicts": 2}
    # the stored rows are the first content, the conflicting ones are kept whole (once each)
    assert store.query("SELECT id, name, label FROM fleet_results ORDER BY id") == [
        {"id": 1, "name": "img1.png", "label": "bridges"}, {"id": 2, "name": "img2.png", "label": "bridges"},
        {"id": 3, "name": "img3.png", "label": "bridges"}, {"id": 4, "name": "img4.png", "label": "bridges"}]
    assert store.add_result(result(2, name="other.png")) == CONFLICT            # again: not a second row
    conflicts = store.query("SELECT board, result_id, payload, sha256 FROM fleet_conflicts ORDER BY result_id")
    assert [(c["board"], c["result_id"]) for c in conflicts] == [("board-a", 1), ("board-a", 2)]
    assert json.loads(conflicts[1]["payload"])["name"] == "other.png"
    assert conflicts[1]["sha256"] == hashlib.sha256(conflicts[1]["payload"].encode()).hexdigest()
    row = store.query("SELECT * FROM fleet_results WHERE board = ? AND id = ?", ("board-a", 1))[0]
    assert row["stage1_score"] == 0.75 and row["review"] == 0 and row["bundle_id"] == BUNDLE
    assert json.loads(row["payload"]) == result(1).message


def totals_of(store) -> dict:
    return {r["board"]: (r["results"], r["last_recorded_at"]) for r in store.query("SELECT * FROM fleet_board_totals")}


def counted(store) -> dict:
    return {r["board"]: (r["n"], r["last"]) for r in store.query(
        "SELECT board, count(*) AS n, max(recorded_at) AS last FROM fleet_results GROUP BY board")}


def test_board_totals_follow_what_is_stored(store):
    """Each board's count and latest recorded_at (what the read API lists the fleet from) move with the stored
    rows only: duplicates and conflicts add nothing, an older result does not move the latest time back."""
    t = "2026-12-02T1{}:00:00.000+00:00"
    assert store.add_results([result(1, recorded_at=t.format(2)), result(2, recorded_at=t.format(1)),
                              result(1, board="board-b", recorded_at="2026-12-02T14:00:00+02:00"),
                              result(1, recorded_at=t.format(2)), result(2, name="other.png")]) == \
        [STORED, STORED, STORED, DUPLICATE, CONFLICT]
    assert store.add_results([result(3, recorded_at=t.format(0)), result(1, board="board-b"),
                              result(4, recorded_at=t.format(5))]) == [STORED, CONFLICT, STORED]
    assert store.add_results([result(5, recorded_at=t.format(1))]) == [STORED]         # late: latest stays
    assert totals_of(store) == counted(store) == {
        "board-a": (5, "2026-12-02T15:00:00.000+00:00"), "board-b": (1, "2026-12-02T12:00:00.000+00:00")}


def test_recorded_at_is_kept_in_utc_and_the_payload_as_sent(store):
    store.add_results([result(1, recorded_at="2026-12-02T00:30:00+01:00"),
                       result(2, recorded_at="2026-12-02T23:59:59.5"),          # no zone: UTC
                       result(3, recorded_at="2026-12-01T23:00:00.000001-02:00")])
    got = store.query("SELECT id, recorded_at, substr(recorded_at, 1, 10) AS day, payload FROM fleet_results "
                      "ORDER BY recorded_at")
    assert [(r["id"], r["recorded_at"], r["day"]) for r in got] == [
        (1, "2026-12-01T23:30:00.000+00:00", "2026-12-01"), (3, "2026-12-02T01:00:00.000+00:00", "2026-12-02"),
        (2, "2026-12-02T23:59:59.500+00:00", "2026-12-02")]
    assert json.loads(got[0]["payload"])["recorded_at"] == "2026-12-02T00:30:00+01:00"


def test_dead_letters_keep_hostile_bytes(store):
    big = bytes(range(256)) * 4096                                             # 1 MiB, NULs and invalid UTF-8
    store.add_dead_letter("sem-inspect/board-a/result", big, "payload of 1048576 bytes is over 65536")
    store.add_dead_letter("sem-inspect/\udcff\0/result", b"\xff\xfe\0{", "bad \0 reason \udc80")
    got = store.query("SELECT topic, reason, payload, size, sha256 FROM fleet_dead_letters ORDER BY id")
    assert got[0]["payload"] == big[:KEEP_BYTES] and got[0]["size"] == len(big)
    assert got[0]["sha256"] == hashlib.sha256(big).hexdigest()
    assert got[1]["payload"] == b"\xff\xfe\0{" and got[1]["size"] == 4
    assert got[1]["topic"] == "sem-inspect/\\udcff\\x00/result" and got[1]["reason"] == "bad \\x00 reason \\udc80"
    assert store.counts()["dead_letters"] == 2


def test_result_text_with_nul_is_stored_escaped(store):
    """A JSON "\\u0000" in a name is valid JSON; PostgreSQL text cannot hold NUL: the column has it escaped on
    both back-ends, the payload keeps the message."""
    assert store.add_result(result(1, name="a\0b")) == STORED
    assert store.add_result(result(1, name="a\0b")) == DUPLICATE
    row = store.query("SELECT name, payload FROM fleet_results")[0]
    assert row["name"] == "a\\x00b" and json.loads(row["payload"])["name"] == "a\0b"


def test_status_text_with_nul_is_stored_escaped_on_both_back_ends(store):
    """Every text written goes through one rule: a retained status whose text fields hold a NUL (valid JSON)
    is stored, escaped, on PostgreSQL too, instead of failing the write (and stopping every collector)."""
    state = parse_bundle_state(json.dumps({"status": "online", "bundle": {
        "current": BUNDLE, "phase": "sha\0dow",
        "last_change": {"at": "2026-12-02T10:00:00\0", "what": "shadow\0", "why": "rollout \0r1"}}}).encode())
    store.set_bundle_state("board-a", state)
    (row,) = store.bundle_states()
    assert row["phase"] == "sha\\x00dow" and row["last_change"] == "shadow\\x00: rollout \\x00r1"
    assert row["last_change_at"] == "2026-12-02T10:00:00\\x00"
    assert json.loads(row["payload"])["bundle"]["phase"] == "sha\0dow"


def test_a_value_the_database_refuses_is_marked_refused_not_a_storage_failure(db, store):
    """What the server refuses as data (SQLSTATE 22 on PostgreSQL) is the message's fault: refused=True, so the
    collector dead-letters that message instead of stopping."""
    if not db.startswith("postgresql"):
        with pytest.raises(StorageError) as exc:
            store.set_status("board-a", 2 ** 70)         # SQLite refuses an integer beyond 64 bits
    else:
        with pytest.raises(StorageError) as exc:
            store.query("SELECT 1 / 0")                  # division_by_zero, SQLSTATE 22012
    assert exc.value.refused and not exc.value.retry


def test_status_and_bundle_state_keep_the_latest(store):
    store.set_status("board-a", "online")
    store.set_status("board-b", "online")
    store.set_status("board-a", "offline")
    assert [(r["board"], r["status"]) for r in store.query("SELECT * FROM fleet_boards ORDER BY board")] == \
        [("board-a", "offline"), ("board-b", "online")]
    first = parse_bundle_state(json.dumps({"status": "online", "bundle": {"current": BUNDLE}}).encode())
    second = parse_bundle_state(json.dumps({"status": "online", "bundle": {
        "current": BUNDLE, "candidate": "ef" * 32, "phase": "shadow",
        "shadow": {"images": 40, "agreement": 0.975, "stage1_agreement": 1.0, "error_rate": 0.0},
        "last_change": {"at": "2026-12-02T10:00:00+00:00", "what": "shadow", "why": "rollout r1"}}}).encode())
    store.set_bundle_state("board-a", first)
    store.set_bundle_state("board-a", second)
    store.set_bundle_state("board-b", first)
    states = store.bundle_states()
    assert [s["board"] for s in states] == ["board-a", "board-b"]
    assert {k: states[0][k] for k in ("current", "candidate", "phase", "shadow_images", "agreement", "last_change")} \
        == {"current": BUNDLE, "candidate": "ef" * 32, "phase": "shadow", "shadow_images": 40, "agreement": 0.975,
            "last_change": "shadow: rollout r1"}
    assert states[1]["candidate"] is None and states[0]["reported_at"]
    assert store.counts()["boards"] == 2


def test_query_is_read_only_with_question_mark_placeholders(store):
    store.add_results([result(1), result(2, name="50%.png"), result(3, board="board-b")])
    assert store.query("SELECT id FROM fleet_results WHERE name LIKE '%\\%%' ESCAPE '\\' AND board = ?",
                       ["board-a"]) == [{"id": 2}]
    assert store.query("SELECT '?' AS q, count(*) AS n FROM fleet_results WHERE board = ?", ("board-b",)) == \
        [{"q": "?", "n": 1}]
    with pytest.raises(StorageError):
        store.query("DELETE FROM fleet_results")
    with pytest.raises(StorageError):
        store.query("UPDATE fleet_results SET name = ?", ("x",))
    assert store.counts()["results"] == 3
    assert store.add_result(result(4)) == STORED                               # writing still works afterwards


def test_a_query_running_too_long_is_stopped(store, monkeypatch):
    monkeypatch.setattr(storage, "QUERY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(postgres, "QUERY_TIMEOUT_S", 0.3)
    with pytest.raises(StorageError) as err:
        store.query("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    assert not err.value.retry
    assert store.query("SELECT 1 AS one") == [{"one": 1}]


def test_a_failed_batch_leaves_nothing(store, monkeypatch):
    """A failure after the batch's rows went in (here: while judging its duplicate) rolls all of it back."""
    store.add_result(result(1))

    def broken(stored_payload, res):
        raise StorageError("judging failed")
    monkeypatch.setattr(storage, "outcome", broken)
    monkeypatch.setattr(postgres, "outcome", broken)
    with pytest.raises(StorageError):
        store.add_results([result(2), result(3), result(1)])
    assert store.counts()["results"] == 1
    monkeypatch.undo()
    assert store.add_results([result(2), result(1)]) == [STORED, DUPLICATE]


def test_schema_version_and_indexes(db, store):
    assert store.query("SELECT version FROM fleet_schema") == [{"version": rows.SCHEMA_VERSION}]
    names = {"fleet_results_board_time", "fleet_results_time_label", "fleet_results_bundle_time"}
    if db.startswith("postgresql://"):
        found = store.query("SELECT indexname AS name FROM pg_indexes WHERE tablename = 'fleet_results'")
    else:
        found = store.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'fleet_results'")
    assert names <= {r["name"] for r in found}
    store.close()
    again = open_storage(db)                                                   # reopening changes nothing
    assert again.query("SELECT version FROM fleet_schema") == [{"version": rows.SCHEMA_VERSION}]
    again.close()


def test_the_board_over_time_query_uses_its_index(db, store):
    batch = [result(i, board=f"board-{i % 50:02d}", recorded_at=f"2026-12-{1 + i % 28:02d}T10:00:00+00:00")
             for i in range(1, 5001)]
    assert store.add_results(batch).count(STORED) == 5000
    sql = "SELECT id, recorded_at FROM fleet_results WHERE board = ? AND recorded_at >= ? ORDER BY recorded_at"
    args = ("board-07", "2026-12-10")
    if db.startswith("postgresql://"):
        store.close()
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("ANALYZE fleet_results")
            plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {postgres.placeholders(sql)}", args))
    else:
        plan = "\n".join(str(r["detail"]) for r in store.query(f"EXPLAIN QUERY PLAN {sql}", args))
    assert "fleet_results_board_time" in plan, plan


def test_a_sqlite_file_of_the_first_collector_opens_and_keeps_its_rows(tmp_path):
    """The first collector's tables (no fleet_schema, no indexes, recorded_at as sent) migrate to the current
    version: indexes, recorded_at in UTC, the board totals of what was stored."""
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
CREATE TABLE IF NOT EXISTS fleet_results (
    board TEXT NOT NULL, id INTEGER NOT NULL, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
    defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT, recorded_at TEXT,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (board, id));
CREATE TABLE IF NOT EXISTS fleet_boards (board TEXT PRIMARY KEY, status TEXT NOT NULL, changed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_dead_letters (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_conflicts (
    id INTEGER PRIMARY KEY, board TEXT NOT NULL, result_id INTEGER NOT NULL, payload TEXT NOT NULL,
    sha256 TEXT NOT NULL, received_at TEXT NOT NULL, UNIQUE (board, result_id, sha256));
CREATE TABLE IF NOT EXISTS fleet_bundle_state (
    board TEXT PRIMARY KEY, current TEXT NOT NULL, candidate TEXT, phase TEXT, shadow_images INTEGER, agreement REAL,
    stage1_agreement REAL, error_rate REAL, last_change_at TEXT, last_change TEXT, payload TEXT NOT NULL,
    reported_at TEXT NOT NULL);
""")
    msg = result(7, recorded_at="2026-12-02T01:00:00+02:00")
    old.execute("INSERT INTO fleet_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.board, msg.id, *msg.columns.values(), msg.payload, "2026-12-02T00:00:01.000+00:00"))
    old.execute("INSERT INTO fleet_boards VALUES ('board-a', 'online', '2026-12-02T00:00:00.000+00:00')")
    old.execute("INSERT INTO fleet_dead_letters (topic, reason, payload, size, sha256, received_at) "
                "VALUES ('t', 'r', x'00ff', 2, 'x', 'now')")
    old.commit()
    old.close()
    s = open_storage(path)
    try:
        assert s.counts() == {"results": 1, "boards": 1, "dead_letters": 1, "conflicts": 0}
        assert s.query("SELECT recorded_at FROM fleet_results") == [{"recorded_at": "2026-12-01T23:00:00.000+00:00"}]
        assert s.query("SELECT version FROM fleet_schema") == [{"version": rows.SCHEMA_VERSION}]
        assert {"fleet_results_board_time", "fleet_results_time_label", "fleet_results_bundle_time"} <= {
            r["name"] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert totals_of(s) == {"board-a": (1, "2026-12-01T23:00:00.000+00:00")}      # backfilled (v2)
        assert s.add_result(msg) == DUPLICATE and s.add_result(result(8)) == STORED
        assert totals_of(s) == counted(s)
    finally:
        s.close()


def test_a_newer_schema_is_refused(db):
    s = open_storage(db)
    s.close()
    if db.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE fleet_schema SET version = 99")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE fleet_schema SET version = 99")
    with pytest.raises(StorageError, match="schema version 99 is newer"):
        open_storage(db)


def test_two_collectors_create_the_postgres_schema_at_once(postgres_server):
    for _ in range(3):
        url = postgres_server.create_database()
        start, opened, errors = threading.Barrier(4), [], []

        def open_one():
            start.wait()
            try:
                opened.append(open_storage(url))
            except Exception as exc:                                           # reported below
                errors.append(exc)
        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert opened[0].query("SELECT version FROM fleet_schema") == [{"version": rows.SCHEMA_VERSION}]
        for s in opened:
            s.close()


def test_two_collectors_writing_the_same_keys_store_each_once(postgres_server):
    """A redelivery after a collector died can reach another one while the first still writes: both store the
    same keys at once, given in opposite orders. Each key is STORED once in all, DUPLICATE for the other, and
    the two never deadlock (rows go in key order). Made certain: a third session holds key 50 until both
    collectors wait, so that their inserts overlap."""
    import psycopg

    url = postgres_server.create_database()
    stores = [open_storage(url), open_storage(url)]
    batch = [result(i) for i in range(1, 101)]
    plans = [batch, batch[::-1]]
    outcomes, errors = [None, None], []
    blocker = psycopg.connect(url)
    blocker.execute("INSERT INTO fleet_results (board, id, payload, received_at) VALUES ('board-a', 50, '{}', 'x')")

    def write(n):
        try:
            outcomes[n] = stores[n].add_results(plans[n])
        except Exception as exc:                                               # reported below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    with psycopg.connect(url, autocommit=True) as watch:
        wait_until(lambda: watch.execute(waiting).fetchone()[0] >= 2, 120, lambda: (outcomes, errors), step=0.01)
    blocker.rollback()
    blocker.close()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for k in range(100):
        assert sorted([outcomes[0][k], outcomes[1][99 - k]]) == [DUPLICATE, STORED], k
    assert stores[0].counts()["results"] == 100
    assert totals_of(stores[0]) == counted(stores[0]) == {"board-a": (100, "2026-12-02T12:00:00.125+00:00")}
    for s in stores:
        s.close()


def test_a_postgres_restart_between_batches_loses_nothing(postgres_server):
    """On a server of its own (restarted and stopped here); postgres_server: skipped where none can start."""
    pg = start_postgres()
    try:
        s = open_storage(pg.create_database())
        assert s.add_results([result(i) for i in range(1, 51)]) == [STORED] * 50
        pg.restart()
        second = [result(i) for i in range(51, 101)]
        try:
            first_try = s.add_results(second)
        except StorageError as exc:
            assert exc.retry, exc
            first_try = s.add_results(second)                                  # connects again
        assert first_try == [STORED] * 50
        pg.stop(remove=False)                                                  # down: refused, worth retrying
        with pytest.raises(StorageError) as err:
            s.add_results([result(101)])
        assert err.value.retry
        pg.start()
        assert s.add_results([result(100), result(101)]) == [DUPLICATE, STORED]
        assert s.counts()["results"] == 101
        assert [r["id"] for r in s.query("SELECT id FROM fleet_results ORDER BY id")] == list(range(1, 102))
        s.close()
    finally:
        pg.stop()


def test_a_sqlite_failure_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError) as err:
        open_storage(tmp_path / "no" / "such" / "folder" / "central.sqlite3")
    assert not err.value.retry and str(err.value).startswith("SQLite: ")


def test_a_storage_is_usable_from_another_thread(store):
    out = []
    t = threading.Thread(target=lambda: out.append(store.add_results([result(1), result(1)])))
    t.start()
    t.join(30)
    assert out == [[STORED, DUPLICATE]]


def test_postgres_without_psycopg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)                         # import psycopg -> ImportError
    with pytest.raises(StorageError) as err:
        open_storage("postgresql://collector@db.fab.example/results")
    assert str(err.value) == 'a postgresql:// database needs psycopg 3: pip install "sem-inspect[central]"'
    assert "\n" not in str(err.value)


def test_a_postgres_url_made_into_a_path_is_refused():
    from pathlib import Path
    with pytest.raises(ValueError, match="pass --db as text"):
        open_storage(Path("postgresql://collector@db.fab.example/results"))


def test_question_marks_become_psycopg_placeholders():
    assert postgres.placeholders("SELECT '?', \"a?\" FROM t WHERE a = ? AND b LIKE '5%' AND c % 2 = ?") == \
        "SELECT '?', \"a?\" FROM t WHERE a = %s AND b LIKE '5%%' AND c %% 2 = %s"
