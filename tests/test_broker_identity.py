"""Identity on the broker is bound to credentials: the shipped deploy/mosquitto-central.conf and
deploy/mosquitto-acl.conf on a real Mosquitto (TLS lines left out, ports and file paths the test's), with a real
collector. A board's credentials cannot take the collector's client id (which would wipe its persistent session
and the results queued in it), cannot keep another board off the broker, cannot write the collectors' presence,
and are not let in on the central listener."""
from __future__ import annotations

import getpass
import json
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO

mqtt = pytest.importorskip("paho.mqtt.client",
                           reason='the fleet tests need paho-mqtt (pip install "sem-inspect[fleet]")')
MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
pytestmark = pytest.mark.skipif(MOSQUITTO is None or not Path(PASSWD).exists(),
                                reason="mosquitto and mosquitto_passwd are not installed (apt-get install mosquitto)")
PREFIX = "sem-inspect"
BOARDS = {"tool-01": "pw-board-1", "tool-02": "pw-board-2"}
CENTRAL = {"collector": "pw-collector", "rollout": "pw-rollout"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    pytest.fail(f"waited {timeout:g} s for {what}; last seen: {predicate()!r}")


class ShippedBroker:
    """Mosquitto with the shipped central config: its two listeners on free loopback ports, TLS files left out,
    its password and ACL files replaced by the test's (two password files, as the config says)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ports = {}
        files = {"boards": folder / "boards.passwd", "central": folder / "central.passwd"}
        for which, users in (("boards", BOARDS), ("central", CENTRAL)):
            for i, (user, pw) in enumerate(users.items()):
                subprocess.run([PASSWD, "-b", *(["-c"] if i == 0 else []), str(files[which]), user, pw], check=True,
                               timeout=30)
        lines = [f"user {getpass.getuser()}", f"persistence_location {folder}/", f"log_dest file {folder}/broker.log"]
        for line in (REPO / "deploy" / "mosquitto-central.conf").read_text().splitlines():
            word = line.split()[0] if line.strip() and not line.startswith("#") else None
            if word is None or word in ("certfile", "keyfile", "cafile", "persistence_location", "log_dest"):
                continue
            if word == "listener":
                shipped = int(line.split()[1])
                self.ports[shipped] = _free_port()
                line = f"listener {self.ports[shipped]} 127.0.0.1"
            elif word == "password_file":
                line = f"password_file {files['boards' if 'boards' in line else 'central']}"
            elif word == "acl_file":
                line = f"acl_file {REPO / 'deploy' / 'mosquitto-acl.conf'}"
            lines.append(line)
        assert set(self.ports) == {8883, 8884}, "the shipped config has a board listener and a central listener"
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for port in self.ports.values():
            _wait(lambda: self.proc.poll() is not None or _listening(port), 15, f"mosquitto on port {port}")
        if self.proc.poll() is not None:
            pytest.fail(f"mosquitto exited {self.proc.returncode}: {(self.folder / 'broker.log').read_text()[-2000:]}")

    def restart_without_state(self) -> None:
        """Stopped, its persistence file removed (the broker lost its sessions), started on the same ports."""
        self.stop()
        (self.folder / "mosquitto.db").unlink(missing_ok=True)
        self.start()

    @property
    def boards_port(self) -> int:
        return self.ports[8883]

    @property
    def central_port(self) -> int:
        return self.ports[8884]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


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
    b = ShippedBroker(tmp_path / "broker")
    yield b
    b.stop()


def collector(broker: ShippedBroker, db: Path, log: Path, pw: Path) -> subprocess.Popen:
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
    _wait(lambda: log.exists() and log.read_text().count("collecting") > started, 60, "the collector to start")
    proc.send_signal(signal.SIGTERM)            # stops; its persistent session keeps what comes meanwhile
    assert proc.wait(30) == 0
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    _wait(lambda: board.connects, 10, "the board to connect")
    for rid in range(1, 21):
        board.publish(f"{PREFIX}/tool-01/result", result("tool-01", rid))
    # the board's credentials with the collector's client id and a clean start: on the board listener the broker
    # makes the client id the user name, so the collector's session is not touched
    thief = Client(broker.boards_port, "collect-1", "tool-01", BOARDS["tool-01"], clean=True)
    _wait(lambda: thief.connects or thief.refused, 10, "the thief's connection")
    thief.close()
    proc = collector(broker, db, log, pw)
    try:
        _wait(lambda: len(stored(db)) == 20 or None, 60, "the 20 results queued for the collector")
        assert stored(db) == {("tool-01", rid) for rid in range(1, 21)}
        assert "no session" not in log.read_text(), log.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        board.close()


def test_a_board_cannot_keep_another_board_off_the_broker(broker):
    victim = Client(broker.boards_port, "tool-02", "tool-02", BOARDS["tool-02"])
    _wait(lambda: victim.connects, 10, "tool-02 to connect")
    victim.c.subscribe(f"{PREFIX}/tool-02/rollout", qos=1)
    attacker = Client(broker.boards_port, "tool-02", "tool-01", BOARDS["tool-01"])     # tool-02's client id
    _wait(lambda: attacker.connects or attacker.refused, 10, "the attacker's connection")
    operator = Client(broker.central_port, "rollout-cli", "rollout", CENTRAL["rollout"])
    _wait(lambda: operator.connects, 10, "the rollout user to connect")
    operator.publish(f"{PREFIX}/tool-02/rollout", b'{"marker": 1}')
    _wait(lambda: victim.messages, 10, "tool-02 to receive its rollout topic")     # still connected, still served
    assert victim.disconnects == 0 and victim.connects == 1
    for c in (victim, attacker, operator):
        c.close()


def test_only_collectors_write_presence_and_board_credentials_stay_off_the_central_listener(broker):
    watcher = Client(broker.central_port, "watcher", "collector", CENTRAL["collector"])
    _wait(lambda: watcher.connects, 10, "the collector user to connect")
    watcher.c.subscribe(f"{PREFIX}/#", qos=1)
    time.sleep(0.2)     # the SUBACK: paho gives no wait here; the marker below proves the order anyway
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    _wait(lambda: board.connects, 10, "the board to connect")
    board.publish(f"{PREFIX}/_collect/central/collect-1", b"offline", retain=True)     # forged presence
    board.publish(f"{PREFIX}/tool-01/result", result("tool-01", 1))                    # a marker after it
    _wait(lambda: any(t == f"{PREFIX}/tool-01/result" for t, _ in watcher.messages), 10, "the marker result")
    assert not any("/_collect/" in t for t, _ in watcher.messages), watcher.messages
    outsider = Client(broker.central_port, "tool-01-central", "tool-01", BOARDS["tool-01"])
    _wait(lambda: outsider.refused or outsider.connects, 10, "the central listener's answer")
    assert outsider.refused and not outsider.connects and re.search(r"[Nn]ot authori[sz]ed|[Bb]ad user", outsider.refused[0])
    for c in (watcher, board, outsider):
        c.close()


def test_a_collector_that_finds_its_session_gone_says_so_loudly(broker, tmp_path):
    db, log, pw = tmp_path / "central.sqlite3", tmp_path / "collect.log", tmp_path / "collector.pw"
    pw.write_text(CENTRAL["collector"])
    proc = collector(broker, db, log, pw)
    try:
        _wait(lambda: log.exists() and log.read_text().count("collecting") >= 1, 60, "the collector to start")
        broker.restart_without_state()
        _wait(lambda: log.read_text().count("collecting") >= 2, 60, "the collector to reconnect")
        text = log.read_text()
        assert "ERROR" in text and "client id collect-1: the broker had no session for it on reconnecting" in text \
            and "LOST" in text, text[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
