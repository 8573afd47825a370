"""The central side: gather the results of every board from the MQTT broker into one database.

    python -m edge_runtime.collect --broker broker.fab.local:1883 --db /srv/fab/inspections.sqlite3 \
        [--prefix sem-inspect] [--username U --password-file F] [--tls [--ca CA.pem]]

Subscribes to PREFIX/+/result and PREFIX/+/status with QoS 1 and a persistent session (client id
`sem-inspect-collect`, clean_session off), so results published while the collector is down are delivered when it
returns. No message can stop it: each is checked (schema.py) and then stored as exactly one of
    a result        once per (board, id): a message delivered twice (the boards publish at least once) is
                    stored once;
    a conflict      same (board, id) as a stored result but other content (a board reusing ids after its
                    database was replaced, or a client publishing under another board's topic: see the broker
                    ACL in deploy/mosquitto-acl.conf): kept in fleet_conflicts, the stored result stays;
    a dead letter   anything rejected (not UTF-8 JSON, wrong types, missing fields, out of range, too large,
                    unknown status), with the reason, in fleet_dead_letters: counted, logged, never lost;
    a board status  online/offline in fleet_boards; the bundles it reports with it (current, candidate, shadow
                    agreement, last change) in fleet_bundle_state.
The broker gets its acknowledgement only after that row is committed (manual acknowledgement): a crash or a
storage failure (disk full: logged, exit 3) leaves the message with the broker, which delivers it again.
SIGTERM/SIGINT: disconnect and exit 0. Storage (SQLite; tables in storage.py) sits behind a small interface so
another back-end can be added.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path

from edge_runtime.collect.schema import Rejected, parse_bundle_state, parse_result, parse_status
from edge_runtime.collect.storage import Storage, open_storage
from edge_runtime.config.service_config import parse_host_port
from edge_runtime.fleet.publisher import FleetUnavailable, need

log = logging.getLogger("edge_inspect.collect")

EXIT_STORAGE = 3


class Collector:
    def __init__(self, storage: Storage, prefix: str):
        self.prefix = prefix.strip("/")
        self.storage = storage
        self.counts: Counter = Counter()        # stored, duplicate, conflict, status, rejected

    @property
    def stored(self) -> int:
        return self.counts["stored"]

    def on_message(self, topic: str, payload: bytes) -> str:
        """Check and store one message; returns what it became. Only a storage failure raises (the message
        is then not acknowledged)."""
        try:
            outcome = self._store(topic, payload)
        except Rejected as exc:
            reason = str(exc)
        except (sqlite3.Error, OSError):
            raise
        except Exception as exc:            # a bug in the checks must not stop the collector either
            log.exception("%a: unexpected error while checking a message", topic[:200])
            reason = f"internal error while checking: {type(exc).__name__}"
        else:
            self.counts[outcome] += 1
            if outcome == "conflict":
                log.warning("%a: a result with this board and id is stored with other content; kept in "
                            "fleet_conflicts", topic[:200])
            return outcome
        self.storage.add_dead_letter(topic, payload, reason)
        self.counts["rejected"] += 1
        log.warning("%a: rejected (%s); kept in fleet_dead_letters", topic[:200], reason)
        return "rejected"

    def _store(self, topic: str, payload: bytes) -> str:
        parts = topic.split("/")
        if len(parts) < 3 or "/".join(parts[:-2]) != self.prefix or parts[-1] not in ("result", "status"):
            raise Rejected(f"not a topic of the form {self.prefix}/BOARD/result or /status")
        board, kind = parts[-2], parts[-1]
        if kind == "status":
            status, bundles = parse_status(board, payload), parse_bundle_state(payload)
            self.storage.set_status(board, status)
            if bundles is not None:         # the board's bundles (issue 20: rollouts); fleet_bundle_state
                self.storage.set_bundle_state(board, bundles)
            return "status"
        return self.storage.add_result(parse_result(board, payload))

    def close(self) -> None:
        self.storage.close()


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
    collector = Collector(open_storage(args.db), args.prefix)
    # manual_ack: the broker is acknowledged only once the message's row is committed (on_message below).
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=False,
                         manual_ack=True)
    if args.username:
        client.username_pw_set(args.username, password)
    if args.tls:
        client.tls_set(ca_certs=args.ca)
    topics = [(f"{collector.prefix}/+/result", 1), (f"{collector.prefix}/+/status", 1)]
    failed: list[BaseException] = []

    def on_connect(cl, userdata, flags, reason, properties):
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        cl.subscribe(topics)
        log.info("collecting %s/+/result from %s:%d into %s", collector.prefix, host, port, args.db)

    def on_message(cl, userdata, msg):
        try:
            topic = msg.topic
        except UnicodeDecodeError:          # brokers refuse such topics; never trust that
            topic = bytes(getattr(msg, "_topic", b"")).decode("utf-8", "backslashreplace")
        try:
            collector.on_message(topic, msg.payload)
        except (sqlite3.Error, OSError) as exc:     # not the message's fault: stop, unacknowledged
            log.error("storage failed (%s); stopping without acknowledging: the broker keeps the message", exc)
            failed.append(exc)
            cl.disconnect()
            return
        cl.ack(msg.mid, msg.qos)

    client.on_connect = on_connect
    client.on_message = on_message
    client.reconnect_delay_set(1, 30)
    signal.signal(signal.SIGTERM, lambda *a: client.disconnect())
    signal.signal(signal.SIGINT, lambda *a: client.disconnect())
    client.connect_async(host, port)
    try:
        client.loop_forever(retry_first_connection=True)
    finally:
        c = collector.counts
        log.info("stopped: %d result(s) stored, %d duplicate(s), %d conflict(s), %d rejected", c["stored"],
                 c["duplicate"], c["conflict"], c["rejected"])
        collector.close()
    return EXIT_STORAGE if failed else 0
