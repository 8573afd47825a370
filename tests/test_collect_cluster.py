"""Collectors at fab scale, as real processes against a real Mosquitto and a real PostgreSQL (started here by
benchmarks/pgserver.py; skipped with the reason where it cannot start): two collectors sharing the results, one
killed with SIGKILL while boards publish (every result stored exactly once, the survivor took over the dead one's
session); a PostgreSQL restart while messages flow (nothing lost); rejected messages kept as dead letters on
PostgreSQL as on SQLite; a batch stored on time and on SIGTERM."""
from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time

import pytest

from central.takeover import RETRY_S
from tests.support.collector import PREFIX, Collector, publish, publisher
from tests.support.messages import valid_result
from tests.support.mosquitto import ShippedCentralBroker, needs_mosquitto
from tests.support.paths import REPO
from tests.support.waiting import wait_until

pytestmark = needs_mosquitto


def pg_rows(url: str, sql: str) -> list[tuple]:
    psycopg = pytest.importorskip("psycopg", reason='psycopg 3 is not installed (pip install "sem-inspect[central]")')
    try:
        with psycopg.connect(url, connect_timeout=5) as con:
            return [tuple(r) for r in con.execute(sql).fetchall()]
    except psycopg.Error:
        return []                   # not created yet, or the server restarting


def pg_count(url: str, table: str = "fleet_results") -> int:
    rows = pg_rows(url, f"SELECT count(*) FROM {table}")
    return rows[0][0] if rows else -1


def sqlite_rows(db, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


class Boards:
    """Boards publishing real result messages (QoS 1) at a steady pace, one thread and one MQTT client each."""

    def __init__(self, port: int, names: list[str], per_board: int, interval_s: float, seed: int = 0,
                 passwords: dict | None = None):
        self.expected = set()
        self.passwords = passwords or {}
        self.threads = []
        self.published = 0
        self.lock = threading.Lock()
        rng = random.Random(seed)
        for name in names:
            messages = [valid_result(name, i, rng) for i in range(1, per_board + 1)]
            self.expected |= {(name, m["id"]) for m in messages}
            self.threads.append(threading.Thread(target=self._run, args=(port, name, messages, interval_s)))

    def _run(self, port, name, messages, interval_s):
        pub = publisher(port, name, (name, self.passwords[name]) if name in self.passwords else None)
        try:
            for m in messages:
                publish(pub, f"{PREFIX}/{name}/result", json.dumps(m).encode())
                with self.lock:
                    self.published += 1
                time.sleep(interval_s)
        finally:
            pub.loop_stop()

    def start(self) -> "Boards":
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join(60)


def stopped_counts(c: Collector) -> tuple[int, int]:
    """(stored, duplicates) from the line a collector logs when it stops."""
    found = re.findall(r"(\d+) result\(s\) stored, (\d+) duplicate", c.log.read_text())
    assert found, c.log.read_text()[-2000:]
    return int(found[-1][0]), int(found[-1][1])


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_two_collectors_one_killed_every_result_stored_once(broker, postgres_server, tmp_path, stop):
    """Two collectors share the results (--share); one is killed with SIGKILL (or stopped, SIGTERM) while four
    boards publish. The broker kept handing the dead one its share (Mosquitto does, to an offline persistent
    session); the survivor takes that session over, so every result is stored exactly once, none missing, and
    the survivor did not store everything itself (the share was shared)."""
    url = postgres_server.create_database()
    share = ["--share", "central", "--batch-ms", "50"]
    c1 = Collector(broker.port, url, tmp_path / "c1.log", *share, "--client-id", "collect-1")
    c2 = Collector(broker.port, url, tmp_path / "c2.log", *share, "--client-id", "collect-2")
    boards = Boards(broker.port, ["tool-01", "tool-02", "tool-03", "tool-04"], per_board=250, interval_s=0.012)
    try:
        boards.start()
        wait_until(lambda: boards.published >= 300, 80, lambda: boards.published)
        c2.proc.send_signal(stop)
        assert c2.proc.wait(10) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
        boards.join()
        n = len(boards.expected)
        wait_until(lambda: pg_count(url) == n, 120, lambda: (pg_count(url), n, c1.log.read_text()[-2000:]))
        assert set(pg_rows(url, "SELECT board, id FROM fleet_results")) == boards.expected
        wait_until(lambda: "took over collect-2's session" in c1.log.read_text(),
                   describe=lambda: c1.log.read_text()[-2000:])
        took = re.findall(r"took over collect-2's session: (\d+) message", c1.log.read_text())
        assert int(took[0]) > 0, c1.log.read_text()[-2000:]
        time.sleep(0.5)
        assert pg_count(url) == n and pg_count(url, "fleet_dead_letters") == 0
        assert c1.stop() == 0
        stored, duplicates = stopped_counts(c1)
        assert stored + duplicates < n, "the survivor did not see every message: the other one had its share"
    finally:
        boards.join()
        c1.stop()
        c2.stop()


def test_postgresql_restart_while_messages_flow(broker, postgres_server, tmp_path):
    """The database restarts (pg_ctl stop -m fast, start) while boards publish: the collector says so once,
    keeps the batch unacknowledged, retries, and stores everything once the server is back: nothing lost."""
    url = postgres_server.create_database()
    c = Collector(broker.port, url, tmp_path / "c.log", "--batch-ms", "50")
    boards = Boards(broker.port, ["tool-01", "tool-02"], per_board=300, interval_s=0.01, seed=1)
    try:
        boards.start()
        wait_until(lambda: pg_count(url) >= 100, 80, lambda: c.log.read_text()[-2000:])
        postgres_server.restart()
        boards.join()
        n = len(boards.expected)
        wait_until(lambda: pg_count(url) == n, 120, lambda: (pg_count(url), n, c.log.read_text()[-2000:]))
        assert set(pg_rows(url, "SELECT board, id FROM fleet_results")) == boards.expected
        log = c.log.read_text()
        assert log.count("database unavailable") == 1 and "database back after" in log, log[-2000:]
        assert c.proc.poll() is None
    finally:
        boards.join()
        c.stop()


BAD = [("tool-01", b"{not json", "not valid JSON"),
       ("tool-01", json.dumps({**valid_result("tool-02", 5, random.Random(5))}).encode(), "is not the topic's board"),
       ("tool-01", json.dumps({**valid_result("tool-01", 6, random.Random(6)), "stage1_score": 1.5}).encode(),
        "stage1_score must be a number in [0, 1]"),
       ("tool-01", json.dumps({**valid_result("tool-01", 7, random.Random(7)), "id": 2**64}).encode(),
        "is outside 64 bits")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_rejected_messages_are_dead_letters_on_both_backends(broker, tmp_path, backend, request):
    """Not JSON, a result under another board's topic, a score out of range, an id beyond 64 bits: each kept in
    fleet_dead_letters with its reason, the same on PostgreSQL as on SQLite. Five messages against batches of
    500: they are stored because --batch-ms passed, not because a batch filled."""
    if backend == "postgresql":
        db = request.getfixturevalue("postgres_server").create_database()

        def rows(sql):
            return pg_rows(db, sql)
    else:
        db = tmp_path / "central.sqlite3"

        def rows(sql):
            return sqlite_rows(db, sql)
    c = Collector(broker.port, db, tmp_path / "c.log")
    pub = publisher(broker.port, "tool-01")
    try:
        good = valid_result("tool-01", 1, random.Random(1))
        publish(pub, f"{PREFIX}/tool-01/result", json.dumps(good).encode())
        for board, payload, _ in BAD:
            publish(pub, f"{PREFIX}/{board}/result", payload)
        wait_until(lambda: len(rows("SELECT id FROM fleet_dead_letters")) == len(BAD),
                   describe=lambda: c.log.read_text()[-2000:])
        dead = rows("SELECT topic, reason, payload, size FROM fleet_dead_letters ORDER BY id")
        for (topic, reason, payload, size), (board, sent, why) in zip(dead, BAD):
            assert topic == f"{PREFIX}/{board}/result" and why in reason and bytes(payload) == sent and \
                size == len(sent), (reason, why)
        assert rows("SELECT board, id FROM fleet_results") == [("tool-01", 1)]
        assert c.stop() == 0
    finally:
        pub.loop_stop()
        c.stop()


def test_sigterm_stores_and_acknowledges_what_is_pending(broker, tmp_path):
    """A batch that would wait a minute (--batch-ms 60000): SIGTERM stores it, acknowledges it and exits 0; the
    next collector finds nothing delivered again."""
    db = tmp_path / "central.sqlite3"
    c = Collector(broker.port, db, tmp_path / "c.log", "--batch-ms", "60000")
    pub = publisher(broker.port, "tool-01")
    try:
        rng = random.Random(3)
        for i in range(1, 6):
            publish(pub, f"{PREFIX}/tool-01/result", json.dumps(valid_result("tool-01", i, rng)).encode())
        time.sleep(0.5)
        assert sqlite_rows(db, "SELECT count(*) FROM fleet_results") in ([], [(0,)]), "a batch waits for --batch-ms"
        assert c.stop() == 0
        assert sqlite_rows(db, "SELECT count(*) FROM fleet_results") == [(5,)]
        c = Collector(broker.port, db, tmp_path / "c.log")
        time.sleep(1.0)
        assert c.stop() == 0
        assert stopped_counts(c) == (0, 0), "nothing was left unacknowledged"
    finally:
        pub.loop_stop()
        c.stop()


def test_share_needs_a_client_id_of_its_own(tmp_path):
    import sys

    proc = subprocess.run([sys.executable, "-m", "central", "--broker", "127.0.0.1:1", "--db",
                           str(tmp_path / "x.sqlite3"), "--share", "central"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == \
        ["collect: error: --share needs a --client-id of its own for each collector of the group"]


BOARD_USERS = {"tool-01": "pw-1-aaa", "tool-02": "pw-2-bbb"}
CENTRAL_USERS = {"collector": "pw-c-ccc", "rollout": "pw-r-ddd"}


def test_the_central_broker_config(postgres_server, tmp_path):
    """deploy/mosquitto-central.conf with deploy/mosquitto-acl.conf on a real Mosquitto (its two listeners, TLS
    files and paths replaced by the test's): boards with their own passwords on the boards' listener, two
    collectors as the user `collector` on the central listener sharing the results; one is killed, the other
    takes its session over (the ACL lets collectors write their presence), every result stored once."""
    shipped = [line for line in (REPO / "deploy" / "mosquitto-central.conf").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {"persistence true", "max_queued_messages 5000000", "per_listener_settings true",
            "use_username_as_clientid true"} <= set(shipped)
    b = ShippedCentralBroker(tmp_path / "broker", BOARD_USERS, CENTRAL_USERS).start()
    url = postgres_server.create_database()
    (tmp_path / "collector.pw").write_text(CENTRAL_USERS["collector"])
    auth = ["--username", "collector", "--password-file", str(tmp_path / "collector.pw"), "--share", "central"]
    c1 = Collector(b.central_port, url, tmp_path / "c1.log", *auth, "--client-id", "collect-1")
    c2 = Collector(b.central_port, url, tmp_path / "c2.log", *auth, "--client-id", "collect-2")
    boards = Boards(b.boards_port, ["tool-01", "tool-02"], per_board=200, interval_s=0.01, seed=2,
                    passwords=BOARD_USERS)
    try:
        boards.start()
        wait_until(lambda: boards.published >= 100, 80, lambda: boards.published)
        c2.proc.send_signal(signal.SIGKILL)
        boards.join()
        n = len(boards.expected)
        wait_until(lambda: pg_count(url) == n, 120, lambda: (pg_count(url), n, c1.log.read_text()[-2000:]))
        assert set(pg_rows(url, "SELECT board, id FROM fleet_results")) == boards.expected
        wait_until(lambda: "took over collect-2's session" in c1.log.read_text(),
                   describe=lambda: c1.log.read_text()[-2000:])
        assert c1.stop() == 0
    finally:
        boards.join()
        c1.stop()
        c2.stop()
        b.stop()


def test_forged_offline_presence_for_both_members_never_leaves_the_group_without_a_subscriber(broker,
                                                                                              postgres_server,
                                                                                              tmp_path):
    """Both members of a --share group are told the other is offline at once (retained presence, as a forged
    last will would say) while boards publish: each takes the other's session over and kicks the other's
    connection. Before: each unsubscribed the other's filters and the group had no subscriber for about a
    second (results dropped by the broker). Now a member unsubscribes a taken-over session's filters only while
    its own connection is up: every result is stored exactly once."""
    url = postgres_server.create_database()
    share = ["--share", "central", "--batch-ms", "50"]
    c1 = Collector(broker.port, url, tmp_path / "c1.log", *share, "--client-id", "collect-1")
    c2 = Collector(broker.port, url, tmp_path / "c2.log", *share, "--client-id", "collect-2")
    boards = Boards(broker.port, ["tool-01", "tool-02", "tool-03"], per_board=300, interval_s=0.01, seed=8)
    forger = publisher(broker.port, "forger")
    try:
        boards.start()
        wait_until(lambda: boards.published >= 150, 80, lambda: boards.published)
        for member in ("collect-1", "collect-2"):
            forger.publish(f"{PREFIX}/_collect/central/{member}", b"offline", qos=1, retain=True)
        wait_until(lambda: "taking over its session" in c1.log.read_text() + c2.log.read_text(), 120,
                   lambda: (c1.log.read_text()[-1500:], c2.log.read_text()[-1500:]))
        boards.join()
        n = len(boards.expected)
        wait_until(lambda: pg_count(url) == n, 240, lambda: (pg_count(url), n, c1.log.read_text()[-1500:],
                                                               c2.log.read_text()[-1500:]))
        assert set(pg_rows(url, "SELECT board, id FROM fleet_results")) == boards.expected
        assert c1.proc.poll() is None and c2.proc.poll() is None
    finally:
        forger.loop_stop()
        boards.join()
        c1.stop()
        c2.stop()


def test_a_retained_status_with_nul_text_never_stops_a_postgresql_collector(broker, postgres_server, tmp_path):
    """A retained status whose text fields hold a NUL (valid JSON). Before: PostgreSQL refused the text, the
    collector took it for a storage failure and exited, at every restart (the message is retained). Now every
    text reaches the database through one rule: stored escaped, and the collector goes on, restart after
    restart."""
    url = postgres_server.create_database()
    pub = publisher(broker.port, "tool-01")
    status = {"status": "online", "bundle": {"current": "ab" * 32, "phase": "sha\u0000dow",
                                             "last_change": {"at": "2026-12-08T10:00:00\u0000", "what": "x\u0000",
                                                             "why": "because\u0000"}}}
    pub.publish(f"{PREFIX}/tool-01/status", json.dumps(status).encode(), qos=1, retain=True).wait_for_publish(30)
    try:
        for run in range(2):
            c = Collector(broker.port, url, tmp_path / f"c{run}.log")
            wait_until(lambda: pg_rows(url, "SELECT phase FROM fleet_bundle_state"), 120,
                       lambda: c.log.read_text()[-2000:])
            publish(pub, f"{PREFIX}/tool-01/result", json.dumps(valid_result("tool-01", run + 1,
                                                                              random.Random(run))).encode())
            wait_until(lambda: pg_count(url) == run + 1, 120, lambda: c.log.read_text()[-2000:])
            assert c.proc.poll() is None, c.log.read_text()[-2000:]
            assert c.stop() == 0
        assert pg_rows(url, "SELECT phase, last_change FROM fleet_bundle_state") == \
            [("sha\\x00dow", "x\\x00: because\\x00")]
    finally:
        pub.loop_stop()


def test_a_killed_collector_that_comes_back_takes_its_session_again(broker, postgres_server, tmp_path):
    """The killed collector is restarted while the other one is taking its session over: its connection takes
    the session back, the takeover stops without reconnecting (no tug of war), and every result is stored
    once."""
    url = postgres_server.create_database()
    share = ["--share", "central", "--batch-ms", "50"]
    c1 = Collector(broker.port, url, tmp_path / "c1.log", *share, "--client-id", "collect-1")
    c2 = Collector(broker.port, url, tmp_path / "c2.log", *share, "--client-id", "collect-2")
    boards = Boards(broker.port, ["tool-01", "tool-02"], per_board=300, interval_s=0.01, seed=4)
    try:
        boards.start()
        wait_until(lambda: boards.published >= 100, 80, lambda: boards.published)
        c2.proc.send_signal(signal.SIGKILL)
        c2.proc.wait(10)
        wait_until(lambda: "taking over its session" in c1.log.read_text(), describe=lambda: c1.log.read_text())
        c2 = Collector(broker.port, url, tmp_path / "c2.log", *share, "--client-id", "collect-2")
        boards.join()
        n = len(boards.expected)
        wait_until(lambda: pg_count(url) == n, 120, lambda: (pg_count(url), n, c1.log.read_text()[-2000:]))
        assert set(pg_rows(url, "SELECT board, id FROM fleet_results")) == boards.expected
        wait_until(lambda: re.search(r"took over collect-2.s session|taken by another connection",
                                     c1.log.read_text()), describe=lambda: c1.log.read_text()[-2000:])
        time.sleep(RETRY_S + 1.0)           # a takeover that lost its connection is not tried again
        log1 = c1.log.read_text()
        assert log1.count("taking over its session") == 1, log1[-2000:]
        assert c2.proc.poll() is None and c2.log.read_text().count("collecting") == 2
        assert c1.stop() == 0 and c2.stop() == 0
    finally:
        boards.join()
        c1.stop()
        c2.stop()


def test_a_collector_started_before_its_database_waits_for_it(broker, postgres_server, tmp_path):
    """PostgreSQL is down when the collector starts: it says so once and waits (no exit), then collects."""
    url = postgres_server.create_database()
    postgres_server.stop(remove=False)
    timer = threading.Timer(2.0, postgres_server.start)
    timer.start()
    c = None
    pub = publisher(broker.port, "tool-01")
    try:
        c = Collector(broker.port, url, tmp_path / "c.log")
        timer.join()
        log = c.log.read_text()
        assert c.proc.poll() is None and log.count("database unavailable") == 1 and "waiting for it" in log, log
        publish(pub, f"{PREFIX}/tool-01/result", json.dumps(valid_result("tool-01", 1, random.Random(1))).encode())
        wait_until(lambda: pg_rows(url, "SELECT board, id FROM fleet_results") == [("tool-01", 1)],
                   describe=lambda: pg_rows(url, "SELECT board, id FROM fleet_results"))
    finally:
        timer.join()
        if not postgres_server.running:
            postgres_server.start()
        pub.loop_stop()
        if c:
            c.stop()


def test_a_database_url_password_is_not_logged():
    from central.options import redact

    assert redact("postgresql://collect:s3cr%40t@db.fab.local:5432/inspections") == \
        "postgresql://collect:***@db.fab.local:5432/inspections"
    assert redact("postgresql://collect@db.fab.local/inspections") == "postgresql://collect@db.fab.local/inspections"
    assert redact("/srv/fab/inspections.sqlite3") == "/srv/fab/inspections.sqlite3"
