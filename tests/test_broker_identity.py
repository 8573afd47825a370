"""Identity on the broker is bound to credentials: the shipped deploy/mosquitto-central.conf and
deploy/mosquitto-acl.conf on a real Mosquitto (TLS lines left out, ports and file paths the test's), with a real
collector. A board's credentials cannot take the collector's client id (which would wipe its persistent session
and the results queued in it), cannot keep another board off the broker, cannot write the collectors' presence,
and are not let in on the central listener."""
from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.mosquitto import ShippedCentralBroker, needs_mosquitto, paho
from tests.support.paths import REPO
from tests.support.waiting import wait_until

mqtt = paho()
pytestmark = needs_mosquitto
PREFIX = "sem-inspect"
BOARDS = {"tool-01": "pw-board-1", "tool-02": "pw-board-2"}
CENTRAL = {"collector": "pw-collector", "rollout": "pw-rollout"}


class Client:
    """A paho client that records its connections, disconnections and messages."""

    def __init__(self, port: int, client_id: str, user: str, password: str, clean: bool = True):
        self.connects, self.disconnects, self.refused, self.messages = 0, 0, [], []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda cl, u, m: self._note(self.messages, (m.topic, bytes(m.payload)))
        self.suback = threading.Event()
        self.c.on_subscribe = lambda *a: self.suback.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _note(self, where: list, item) -> None:
        with self.lock:
            where.append(item)

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            self._note(self.refused, str(reason))
        else:
            with self.lock:
                self.connects += 1

    def _on_disconnect(self, client, userdata, flags, reason, props):
        with self.lock:
            self.disconnects += 1

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the broker's SUBACK."""
        self.suback.clear()
        self.c.subscribe(topic, qos=1)
        assert self.suback.wait(60), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def result(board: str, rid: int) -> bytes:
    rng = random.Random(rid)
    return json.dumps({"id": rid, "board": board, "outcome": "inspected", "name": f"w{rid}.png", "label": "clean",
                       "stage1_score": round(rng.random() * 0.4, 3), "defect_class": None, "confidence": 0.9,
                       "review": False, "sha256": "ab" * 32, "bundle_id": "cd" * 32,
                       "recorded_at": "2026-12-08T10:00:00+00:00", "latency_ms": 3.0}).encode()


def stored(db: Path) -> set[tuple[str, int]]:
    if not db.exists():
        return set()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return set(con.execute("SELECT board, id FROM fleet_results"))
    except sqlite3.OperationalError:
        return set()
    finally:
        con.close()


@pytest.fixture
def broker(tmp_path):
    b = ShippedCentralBroker(tmp_path / "broker", BOARDS, CENTRAL).start()
    yield b
    b.stop()


def collector(broker: ShippedCentralBroker, db: Path, log: Path, pw: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "central", "--broker", f"127.0.0.1:{broker.central_port}",
                                 "--prefix", PREFIX, "--db", str(db), "--username", "collector", "--password-file",
                                 str(pw), "--client-id", "collect-1"], stdout=fh, stderr=fh, cwd=REPO)
    return proc


def test_a_board_taking_the_collectors_client_id_loses_nothing_the_collector_was_sent(broker, tmp_path):
    db, log, pw = tmp_path / "central.sqlite3", tmp_path / "collect.log", tmp_path / "collector.pw"
    pw.write_text(CENTRAL["collector"])
    started = log.read_text().count("collecting") if log.exists() else 0
    proc = collector(broker, db, log, pw)
    wait_until(lambda: log.exists() and log.read_text().count("collecting") > started, 60, "the collector to start")
    proc.send_signal(signal.SIGTERM)            # stops; its persistent session keeps what comes meanwhile
    assert proc.wait(30) == 0
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    wait_until(lambda: board.connects, 60, "the board to connect")
    for rid in range(1, 21):
        board.publish(f"{PREFIX}/tool-01/result", result("tool-01", rid))
    # the board's credentials with the collector's client id and a clean start: on the board listener the broker
    # makes the client id the user name, so the collector's session is not touched
    thief = Client(broker.boards_port, "collect-1", "tool-01", BOARDS["tool-01"], clean=True)
    wait_until(lambda: thief.connects or thief.refused, 60, "the thief's connection")
    thief.close()
    proc = collector(broker, db, log, pw)
    try:
        wait_until(lambda: len(stored(db)) == 20 or None, 60, "the 20 results queued for the collector")
        assert stored(db) == {("tool-01", rid) for rid in range(1, 21)}
        assert "no session" not in log.read_text(), log.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        board.close()


def test_a_board_cannot_keep_another_board_off_the_broker(broker):
    victim = Client(broker.boards_port, "tool-02", "tool-02", BOARDS["tool-02"])
    wait_until(lambda: victim.connects, 60, "tool-02 to connect")
    victim.subscribe(f"{PREFIX}/tool-02/rollout")
    attacker = Client(broker.boards_port, "tool-02", "tool-01", BOARDS["tool-01"])     # tool-02's client id
    wait_until(lambda: attacker.connects or attacker.refused, 60, "the attacker's connection")
    operator = Client(broker.central_port, "rollout-cli", "rollout", CENTRAL["rollout"])
    wait_until(lambda: operator.connects, 60, "the rollout user to connect")
    operator.publish(f"{PREFIX}/tool-02/rollout", b'{"marker": 1}')
    wait_until(lambda: victim.messages, 60, "tool-02 to receive its rollout topic")     # still connected, still served
    assert victim.disconnects == 0 and victim.connects == 1
    for c in (victim, attacker, operator):
        c.close()


def test_only_collectors_write_presence_and_board_credentials_stay_off_the_central_listener(broker):
    watcher = Client(broker.central_port, "watcher", "collector", CENTRAL["collector"])
    wait_until(lambda: watcher.connects, 60, "the collector user to connect")
    watcher.subscribe(f"{PREFIX}/#")
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    wait_until(lambda: board.connects, 60, "the board to connect")
    board.publish(f"{PREFIX}/_collect/central/collect-1", b"offline", retain=True)     # forged presence
    board.publish(f"{PREFIX}/tool-01/result", result("tool-01", 1))                    # a marker after it
    wait_until(lambda: any(t == f"{PREFIX}/tool-01/result" for t, _ in watcher.messages), 60, "the marker result")
    assert not any("/_collect/" in t for t, _ in watcher.messages), watcher.messages
    outsider = Client(broker.central_port, "tool-01-central", "tool-01", BOARDS["tool-01"])
    wait_until(lambda: outsider.refused or outsider.connects, 60, "the central listener's answer")
    assert outsider.refused and not outsider.connects and re.search(r"[Nn]ot authori[sz]ed|[Bb]ad user", outsider.refused[0])
    for c in (watcher, board, outsider):
        c.close()


def test_a_collector_that_finds_its_session_gone_says_so_loudly(broker, tmp_path):
    db, log, pw = tmp_path / "central.sqlite3", tmp_path / "collect.log", tmp_path / "collector.pw"
    pw.write_text(CENTRAL["collector"])
    proc = collector(broker, db, log, pw)
    try:
        wait_until(lambda: log.exists() and log.read_text().count("collecting") >= 1, 60, "the collector to start")
        broker.restart_without_state()
        wait_until(lambda: log.read_text().count("collecting") >= 2, 60, "the collector to reconnect")
        text = log.read_text()
        assert "ERROR" in text and "client id collect-1: the broker had no session for it on reconnecting" in text \
            and "LOST" in text, text[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
