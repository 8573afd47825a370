"""MQTT publishing against a real Mosquitto broker (Debian package `mosquitto`), started here on a free
loopback port: each result arrives once with its payload; a broker outage and a kill -9 lose nothing."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.images import png_bytes
from tests.support.mosquitto import Broker, needs_mosquitto, paho
from tests.support.waiting import wait_until
from tests.support.watch import files_in, rows, start_service

mqtt = paho()
pytestmark = needs_mosquitto

PREFIX = "fab-test"
BOARD = "board-a"


class Subscriber:
    """A consumer with a persistent session (clean_session=False, QoS 1): it misses nothing while it or the
    broker is away."""

    def __init__(self, port: int, ca: Path | None = None, auth: tuple[str, str] | None = None):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-consumer", clean_session=False)
        if ca:
            c.tls_set(ca_certs=str(ca))
        if auth:
            c.username_pw_set(*auth)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{PREFIX}/#", qos=1)
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 1)
        c.connect_async("127.0.0.1", port)
        c.loop_start()
        self.client = c
        assert self.subscribed.wait(60), "test subscriber could not subscribe"

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def results(self) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p in self.messages if t == f"{PREFIX}/{BOARD}/result"]

    def last(self, kind: str) -> bytes | None:
        with self.lock:
            found = [p for t, p in self.messages if t == f"{PREFIX}/{BOARD}/{kind}"]
        return found[-1] if found else None

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def status_of(sub: "Subscriber") -> str | None:
    """The board's last status: {"status": "online" | "offline", ...} (edge_runtime/fleet/publisher.py)."""
    raw = sub.last("status")
    return None if raw is None else json.loads(raw)["status"]


def fleet_args(port: int, *extra) -> list[str]:
    return ["--mqtt", f"127.0.0.1:{port}", "--mqtt-prefix", PREFIX, "--board", BOARD, "--mqtt-stats-seconds", "0.5",
            *extra]


def published_flags(db: Path) -> list[int]:
    return [r["published"] for r in rows(db)]


def check_delivery(received: list[dict], db: Path) -> None:
    """Every recorded result arrived at least once; duplicates carry the same id and the same payload."""
    recorded = {r["id"]: r for r in rows(db)}
    by_id: dict[int, dict] = {}
    for msg in received:
        assert msg["board"] == BOARD
        if msg["id"] in by_id:
            assert msg == by_id[msg["id"]], "a duplicate must be the same message"
        by_id[msg["id"]] = msg
    assert sorted(by_id) == sorted(recorded)
    for i, msg in by_id.items():
        row = recorded[i]
        assert (msg["name"], msg["label"], msg["sha256"], msg["outcome"]) == \
            (row["name"], row["label"], row["sha256"], row["outcome"])


def stop(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()


def test_results_arrive_once_with_status_and_stats(tiny_bundle, folders, tmp_path, broker):
    sub = Subscriber(broker.port)
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
    try:
        wait_until(lambda: status_of(sub) == "online", 240, lambda: log.read_text())
        for i in range(6):
            (folders["watch"] / f"img {i}.png").write_bytes(png_bytes(i))
        (folders["watch"] / "bad.png").write_bytes(b"not an image")
        wait_until(lambda: len(sub.results()) >= 7, 240, lambda: log.read_text())
        wait_until(lambda: sub.last("stats") is not None, describe=lambda: sub.last("stats"))
        stats = json.loads(sub.last("stats"))
        assert stats["board"] == BOARD and stats["inspected"] + stats["quarantined"] >= 1
        wait_until(lambda: published_flags(folders["db"]) == [1] * 7, describe=lambda: published_flags(folders["db"]))
        stop(proc, log)
        assert status_of(sub) == "offline"
        received = sub.results()
        assert len(received) == 7, "no outage: each result exactly once"
        check_delivery(received, folders["db"])
        # A restart sends nothing again: everything was acknowledged.
        proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
        wait_until(lambda: status_of(sub) == "online", 240, lambda: log.read_text())
        time.sleep(1.0)
        stop(proc, log)
        assert len(sub.results()) == 7
        bad = next(m for m in received if m["name"] == "bad.png")
        assert bad["outcome"] == "quarantined" and bad["label"] is None and bad["reason"]
        good = next(m for m in received if m["name"] == "img 0.png")
        assert good["label"] and 0 <= good["stage1_score"] <= 1 and good["bundle_id"]
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_broker_outage_loses_nothing(tiny_bundle, folders, tmp_path, broker):
    sub = Subscriber(broker.port)
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
    try:
        wait_until(lambda: status_of(sub) == "online", 240, lambda: log.read_text())
        for i in range(3):
            (folders["watch"] / f"before {i}.png").write_bytes(png_bytes(1000 + i))
        wait_until(lambda: len(sub.results()) >= 3, 240, lambda: log.read_text())
        broker.stop()
        for i in range(100):
            (folders["watch"] / f"during {i:03d}.png").write_bytes(png_bytes(i))
        wait_until(lambda: len(rows(folders["db"])) == 103 and len(files_in(folders["processed"])) == 103,
                   480, lambda: log.read_text())
        assert published_flags(folders["db"]).count(0) >= 100, "not acknowledged while the broker is down"
        assert proc.poll() is None, "the service goes on without its broker"
        broker.start()
        wait_until(lambda: len({m["id"] for m in sub.results()}) == 103,
                   360, lambda: (len(sub.results()), log.read_text()))
        wait_until(lambda: published_flags(folders["db"]) == [1] * 103, 120, lambda: published_flags(folders["db"]))
        stop(proc, log)
        check_delivery(sub.results(), folders["db"])
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_kill_9_between_commit_and_publish_republishes(tiny_bundle, folders, tmp_path, broker):
    """Results committed and sent, but the broker (frozen with SIGSTOP) never acknowledged them when the service
    is killed: they are not marked published, and the restarted service publishes them again."""
    sub = Subscriber(broker.port)
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
    frozen = False
    try:
        wait_until(lambda: status_of(sub) == "online", 240, lambda: log.read_text())
        broker.proc.send_signal(signal.SIGSTOP)
        frozen = True
        for i in range(5):
            (folders["watch"] / f"img {i}.png").write_bytes(png_bytes(i))
        wait_until(lambda: len(files_in(folders["processed"])) == 5, 240, lambda: log.read_text())
        wait_until(lambda: [r["state"] for r in rows(folders["db"])] == ["done"] * 5,
                   120, lambda: [r["state"] for r in rows(folders["db"])])
        time.sleep(0.5)             # time to send them (unacknowledged: the broker is frozen)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert published_flags(folders["db"]) == [0] * 5, "marked only once the broker acknowledged"
        broker.proc.send_signal(signal.SIGCONT)
        frozen = False
        wait_until(lambda: status_of(sub) == "offline", 120, "the last will tells it went away")
        proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
        wait_until(lambda: len({m["id"] for m in sub.results()}) == 5, 240, lambda: log.read_text())
        wait_until(lambda: published_flags(folders["db"]) == [1] * 5, 120, lambda: published_flags(folders["db"]))
        stop(proc, log)
        check_delivery(sub.results(), folders["db"])
        assert len(rows(folders["db"])) == 5, "republished, never re-recorded"
    finally:
        if frozen:
            broker.proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_restart_with_the_broker_down_then_up_publishes_the_backlog(tiny_bundle, folders, tmp_path, broker):
    sub = Subscriber(broker.port)
    broker.stop()
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
    try:
        for i in range(5):
            (folders["watch"] / f"img {i}.png").write_bytes(png_bytes(i))
        wait_until(lambda: len(files_in(folders["processed"])) == 5, 240, lambda: log.read_text())
        wait_until(lambda: [r["state"] for r in rows(folders["db"])] == ["done"] * 5,
                   120, lambda: [r["state"] for r in rows(folders["db"])])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert published_flags(folders["db"]) == [0] * 5
        broker.start()
        proc = start_service(tiny_bundle, folders, log, *fleet_args(broker.port))
        wait_until(lambda: len({m["id"] for m in sub.results()}) == 5, 240, lambda: log.read_text())
        wait_until(lambda: published_flags(folders["db"]) == [1] * 5, 120, lambda: published_flags(folders["db"]))
        stop(proc, log)
        check_delivery(sub.results(), folders["db"])
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_schema_3_migration_marks_old_rows_published(tmp_path):
    from edge_runtime.db.store import SCHEMA_VERSION, Store
    db = tmp_path / "v2.sqlite3"
    store = Store(db)
    store.close()
    # Build a version-2 file by hand: the v3 table minus `published`.
    con = sqlite3.connect(db)
    con.execute("DROP INDEX results_publish")
    con.execute("ALTER TABLE results DROP COLUMN published")
    con.execute("INSERT INTO results (key, name, src_path, dest_path, size, mtime_ns, outcome, state, journaled, "
                "recorded_at) VALUES ('k', 'a.png', 'a', 'b', 1, 1, 'inspected', 'done', 1, 'now')")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    store = Store(db)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert store.count_unpublished() == 0 and store.get("k")["published"] == 1
    finally:
        store.close()


def make_tls(folder: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl); returns the folder."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir()
    san = folder / "san.ext"
    san.write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
                 "-subj", "/CN=test-ca"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                 "-subj", "/CN=127.0.0.1"],
                ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "server.pem", "-days", "1", "-extfile", "san.ext"]):
        subprocess.run([openssl, *cmd], cwd=folder, check=True, capture_output=True, timeout=60)
    return folder


def test_tls_and_password(tiny_bundle, folders, tmp_path):
    """TLS with the CA from the config and a user name/password: results arrive; a wrong password connects
    nothing, keeps the results unpublished and never shows up in the log."""
    tls = make_tls(tmp_path / "tls")
    b = Broker(tmp_path / "broker", passwords={"board07": "right-pw-123"},
               extra=[f"cafile {tls}/ca.pem", f"certfile {tls}/server.pem", f"keyfile {tls}/server.key"])
    b.start()
    sub = Subscriber(b.port, ca=tls / "ca.pem", auth=("board07", "right-pw-123"))
    log = tmp_path / "service.log"
    wrong = fleet_args(b.port, "--mqtt-tls", "--mqtt-ca", str(tls / "ca.pem"), "--mqtt-username", "board07",
                       "--mqtt-password", "wrong-pw-456")
    proc = start_service(tiny_bundle, folders, log, *wrong)
    try:
        (folders["watch"] / "a.png").write_bytes(png_bytes(1))
        wait_until(lambda: "refused the connection" in log.read_text(), 240, lambda: log.read_text())
        wait_until(lambda: len(rows(folders["db"])) == 1, 120, lambda: rows(folders["db"]))
        stop(proc, log)
        assert published_flags(folders["db"]) == [0] and sub.results() == []
        assert "wrong-pw-456" not in log.read_text()
        right = [a if a != "wrong-pw-456" else "right-pw-123" for a in wrong]
        proc = start_service(tiny_bundle, folders, log, *right)
        (folders["watch"] / "b.png").write_bytes(png_bytes(2))
        wait_until(lambda: len(sub.results()) == 2, 240, lambda: log.read_text())
        wait_until(lambda: published_flags(folders["db"]) == [1, 1], 120, lambda: published_flags(folders["db"]))
        stop(proc, log)
        check_delivery(sub.results(), folders["db"])
        assert "right-pw-123" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()
        b.stop()


def test_the_one_client_builder_sets_id_protocol_login_tls_and_keepalive():
    """edge_runtime/fleet/mqtt.py builds every MQTT client (board publisher, collector, takeovers, rollouts)."""
    import ssl

    from edge_runtime.fleet.mqtt import BrokerSettings, connect, new_client

    broker = BrokerSettings("127.0.0.1", 8883, "board07", "s3cret", tls=True, keepalive=30)
    assert "s3cret" not in repr(broker)
    client = new_client(broker, "sem-inspect-board07", mqtt5=True, manual_ack=True)
    assert client.protocol == mqtt.MQTTv5 and (client.username, client.password) == ("board07", "s3cret")
    assert client._client_id == b"sem-inspect-board07"
    assert client._ssl_context.verify_mode == ssl.CERT_REQUIRED       # the broker's certificate is checked
    connect(client, broker)             # asynchronous: nothing is contacted until loop_start
    assert (client.host, client.port, client.keepalive) == ("127.0.0.1", 8883, 30)
    plain = new_client(BrokerSettings("127.0.0.1", 1883), "sem-inspect-rollout-1")
    assert plain.protocol == mqtt.MQTTv311 and plain.username is None and not plain._ssl
