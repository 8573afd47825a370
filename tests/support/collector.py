"""The central collector (`python -m central`) as a real process, and MQTT publishers standing in for boards."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support.messages import PREFIX
from tests.support.mosquitto import paho
from tests.support.paths import REPO
from tests.support.waiting import wait_until

START_TIMEOUT_S = 120


class Collector:
    """`python -m central --broker 127.0.0.1:PORT --prefix sem-inspect --db DB EXTRA...`, started and seen
    collecting (or exited)."""

    def __init__(self, port: int, db: Path, log: Path, *extra: str):
        self.db, self.log = db, log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "central", "--broker",
                                          f"127.0.0.1:{port}", "--prefix", PREFIX, "--db", str(db), *extra],
                                         stdout=fh, stderr=fh, cwd=REPO)
        self.started = log.read_text().count("collecting") + 1
        wait_until(lambda: log.read_text().count("collecting") >= self.started or self.proc.poll() is not None,
                   START_TIMEOUT_S, lambda: log.read_text()[-3000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def counts(self) -> dict:
        """Rows in its SQLite store's results, dead letters and conflicts ({} before the tables exist)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return {t: con.execute(f"SELECT count(*) FROM fleet_{t}").fetchone()[0]
                    for t in ("results", "dead_letters", "conflicts")}
        except sqlite3.OperationalError:
            return {}
        finally:
            con.close()

    def rows(self, sql: str) -> list:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


def publisher(port: int, name: str = "test-board", auth: tuple[str, str] | None = None):
    """A connected paho client (its network loop running) with client id `name`."""
    mqtt = paho()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    if auth:
        pub.username_pw_set(*auth)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    return pub


def publish(pub, topic: str, payload: bytes) -> None:
    """Publish with QoS 1 and wait until the broker has it."""
    pub.publish(topic, payload, qos=1).wait_for_publish(30)
