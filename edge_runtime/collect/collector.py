"""The central side: gather the results of every board from the MQTT broker into one SQLite table.

    python -m edge_runtime.collect --broker broker.fab.local:1883 --db /srv/fab/inspections.sqlite3 \
        [--prefix sem-inspect] [--username U --password-file F] [--tls [--ca CA.pem]]

Subscribes to PREFIX/+/result and PREFIX/+/status with QoS 1 and a persistent session (client id
`sem-inspect-collect`, clean_session off), so results published while the collector is down are delivered when it
returns. Each result is stored before the broker gets its acknowledgement, keyed by (board, id): a message
delivered twice (the boards publish at least once) is stored once. A malformed message is logged and skipped.
SIGTERM/SIGINT: disconnect and exit 0.

    CREATE TABLE fleet_results (board TEXT, id INTEGER, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
        defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT, recorded_at TEXT,
        payload TEXT,             -- the whole message (JSON)
        received_at TEXT, PRIMARY KEY (board, id));
    CREATE TABLE fleet_boards (board TEXT PRIMARY KEY, status TEXT, changed_at TEXT);

For PostgreSQL, the same two tables with `INSERT ... ON CONFLICT DO NOTHING` do the same job.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
from pathlib import Path

from edge_runtime.config.service_config import parse_host_port
from edge_runtime.db.store import utc_now
from edge_runtime.fleet.publisher import FleetUnavailable, need

log = logging.getLogger("edge_inspect.collect")

SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_results (
    board TEXT NOT NULL, id INTEGER NOT NULL, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
    defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT, recorded_at TEXT,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (board, id));
CREATE TABLE IF NOT EXISTS fleet_boards (board TEXT PRIMARY KEY, status TEXT NOT NULL, changed_at TEXT NOT NULL);
"""
FIELDS = ("name", "label", "outcome", "stage1_score", "defect_class", "confidence", "review", "sha256", "bundle_id",
          "recorded_at")


class Collector:
    def __init__(self, db: Path, prefix: str):
        self.prefix = prefix.strip("/")
        self.db = sqlite3.connect(db, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.stored = 0

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 3 or "/".join(parts[:-2]) != self.prefix:
            return
        board, kind = parts[-2], parts[-1]
        if kind == "status":
            self.db.execute("INSERT INTO fleet_boards VALUES (?, ?, ?) ON CONFLICT(board) DO UPDATE SET "
                            "status = excluded.status, changed_at = excluded.changed_at",
                            (board, payload.decode("utf-8", "replace")[:32], utc_now()))
            return
        if kind != "result":
            return
        try:
            msg = json.loads(payload)
            rid = msg["id"]
            if not isinstance(msg, dict) or not isinstance(rid, int) or msg.get("board", board) != board:
                raise ValueError("not a result of this board")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: skipping a malformed message (%s)", topic, exc)
            return
        cur = self.db.execute(
            f"INSERT OR IGNORE INTO fleet_results (board, id, {', '.join(FIELDS)}, payload, received_at) "
            f"VALUES ({', '.join('?' * (len(FIELDS) + 4))})",
            (board, rid, *[_scalar(msg.get(f)) for f in FIELDS], payload.decode("utf-8"), utc_now()))
        self.stored += cur.rowcount

    def close(self) -> None:
        self.db.close()


def _scalar(value):
    return int(value) if isinstance(value, bool) else value if isinstance(value, (int, float, str)) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge_runtime.collect",
                                description="Gather every board's results from the MQTT broker into one SQLite table.")
    p.add_argument("--broker", required=True, metavar="HOST:PORT")
    p.add_argument("--db", required=True, type=Path, metavar="PATH", help="central SQLite file (created)")
    p.add_argument("--prefix", default="sem-inspect", help="the boards' mqtt_prefix (default: sem-inspect)")
    p.add_argument("--client-id", default="sem-inspect-collect", help="persistent-session id (one per collector)")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, help="file holding the password (not on the command line)")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca", help="CA certificate file for --tls")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        host, port = parse_host_port(args.broker)
        mqtt = need("paho.mqtt.client", "collect", "paho-mqtt")
        password = args.password_file.read_text().strip() if args.password_file else None
    except (ValueError, FleetUnavailable, OSError) as exc:
        print(f"collect: error: {exc}", file=sys.stderr)
        return 2
    collector = Collector(args.db, args.prefix)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False)
    if args.username:
        client.username_pw_set(args.username, password)
    if args.tls:
        client.tls_set(ca_certs=args.ca)
    topics = [(f"{collector.prefix}/+/result", 1), (f"{collector.prefix}/+/status", 1)]

    def on_connect(cl, userdata, flags, reason, properties):
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        cl.subscribe(topics)
        log.info("collecting %s/+/result from %s:%d into %s", collector.prefix, host, port, args.db)

    client.on_connect = on_connect
    client.on_message = lambda cl, userdata, msg: collector.on_message(msg.topic, msg.payload)
    client.reconnect_delay_set(1, 30)
    signal.signal(signal.SIGTERM, lambda *a: client.disconnect())
    signal.signal(signal.SIGINT, lambda *a: client.disconnect())
    client.connect_async(host, port)
    try:
        client.loop_forever(retry_first_connection=True)
    finally:
        log.info("stopped: %d result(s) stored", collector.stored)
        collector.close()
    return 0
