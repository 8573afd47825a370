"""The central side: gather the results of every board from the MQTT broker into one database.

    python -m central --broker broker.fab.local:1883 --db /srv/fab/inspections.sqlite3 \
        [--db postgresql://collect@db.fab.local/inspections] [--share GROUP --client-id ID] \
        [--batch 500 --batch-ms 100] [--prefix sem-inspect] [--username U --password-file F] [--tls [--ca CA.pem]]

MQTT 5, QoS 1, a persistent session (clean start off, the session never expires), so results published while
the collector is down are delivered when it returns. No message can stop it: each is checked (schema.py) and then
stored as exactly one of
    a result        once per (board, id): a message delivered twice (the boards publish at least once) is
                    stored once;
    a conflict      same (board, id) as a stored result but other content (a board reusing ids after its
                    database was replaced, or a client publishing under another board's topic: see the broker
                    ACL in deploy/mosquitto-acl.conf): kept in fleet_conflicts, the stored result stays;
    a dead letter   anything rejected (not UTF-8 JSON, wrong types, missing fields, out of range, too large,
                    unknown status), with the reason, in fleet_dead_letters: counted, logged, never lost;
    a board status  online/offline in fleet_boards; the bundles it reports with it (current, candidate, shadow
                    agreement, last change) in fleet_bundle_state.

Batches, acknowledged after the commit (batches.py): messages are checked as they arrive and stored in batches
(--batch messages, or what waited --batch-ms), the results of a batch in one transaction, and only then is every
message of the batch acknowledged to the broker. A crash at any point leaves the unacknowledged messages with the
broker, which delivers them again; stored again they are duplicates, so nothing is lost and nothing is stored
twice. The broker may have RECEIVE_FACTOR batches unacknowledged in flight (the Receive Maximum sent on connect;
for MQTT 5 clients Mosquitto 2.0 uses it in place of max_inflight_messages: measured).

Storage failures: StorageError(retry=True) (a PostgreSQL server restarting, the connection lost) is said once;
the batch stays unacknowledged and is retried with a capped backoff (0.5 s doubling to 10 s) until the database
is back. Any other storage failure (SQLite locked by another writer, disk full) stops the collector, exit 3,
without acknowledging. SIGTERM/SIGINT: what is pending is stored and acknowledged, then exit 0.

Several collectors (--share GROUP, each with its own --client-id): results come through the MQTT 5 shared
subscription $share/GROUP/PREFIX/+/result, so the broker hands each message to one collector of the group. Statuses
do not: they are retained, and retained messages are never delivered through a shared subscription, so every
collector subscribes to PREFIX/+/status itself (a status is the latest state of a board: storing it once per
collector is an idempotent upsert; a malformed status is a dead letter once per collector). Mosquitto keeps handing
a shared message to a member whose persistent session is offline (it waits in that session), and ends a session's
in-flight messages with the session, so a collector that dies would strand its share. Hence takeover.py: each
collector announces itself (retained "online", a last will "offline") and a collector that sees a member of its
group offline resumes that member's session, stores and acknowledges what waits there, removes the member's
subscriptions and ends the session: the broker then hands everything to the members that are alive.
"""
from __future__ import annotations

import argparse
import logging
import re
import sqlite3
import signal
import sys
import threading

from central.batches import RETRY_FIRST_S, RETRY_MAX_S, Batcher, BatchStore, Link, Message, message_topic
from central.options import add_broker_flags, add_db_flag, broker_settings, redact
from central.storage import Storage, StorageError, open_storage
from central.takeover import Presence
from edge_runtime.command import CommandError, add_log_level, reported, run_command
from edge_runtime.exits import EXIT_OK, EXIT_STORAGE
from edge_runtime.extras import MissingExtra
from edge_runtime.fleet.mqtt import BrokerSettings, connect, new_client, paho

log = logging.getLogger("edge_inspect.collect")

PROG = "collect"
DEFAULT_CLIENT_ID = "sem-inspect-collect"
# Measured (20,000 queued results, one collector, 2 shared cores): into PostgreSQL 1,100 results/s one per
# transaction, 6,100 / 6,900 / 7,800 with batches of 100 / 500 / 2,000: past a few hundred the parsing, not the
# commit, is the limit, and a larger batch only adds delay when the stream is slow.
BATCH, BATCH_MS = 500, 100
RECEIVE_FACTOR = 4                  # batches in flight: the next ones arrive while one commits
NEVER_EXPIRES = 0xFFFFFFFF          # MQTT 5 Session Expiry Interval: the session outlives any outage
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m central",
                                description="Gather every board's results from the MQTT broker into one database.")
    add_broker_flags(p)
    add_db_flag(p, "the central database (created)")
    p.add_argument("--client-id", help=f"persistent-session id, one per collector (default: {DEFAULT_CLIENT_ID}; "
                                       "required with --share)")
    p.add_argument("--share", metavar="GROUP",
                   help="share the results with the other collectors of GROUP (MQTT 5 shared subscription)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"store at most this many messages a transaction "
                                                            f"(default {BATCH})")
    p.add_argument("--batch-ms", type=float, default=BATCH_MS,
                   help=f"store what waits after this many milliseconds (default {BATCH_MS})")
    add_log_level(p)
    return p


def check_args(args) -> None:
    """ValueError (one line) for options that cannot work."""
    if not 1 <= args.batch <= 10_000:
        raise ValueError(f"--batch must be 1..10000, got {args.batch}")
    if not 0 <= args.batch_ms <= 60_000:
        raise ValueError(f"--batch-ms must be 0..60000, got {args.batch_ms:g}")
    if args.share is not None:         # both become topic levels (takeover.py: the group's presence)
        if not _TOPIC_LEVEL.fullmatch(args.share):
            raise ValueError(f"--share must be 1-64 letters, digits, '.', '_' or '-', got {args.share!r}")
        if not args.client_id:
            raise ValueError("--share needs a --client-id of its own for each collector of the group")
        if not _TOPIC_LEVEL.fullmatch(args.client_id):
            raise ValueError(f"--client-id must be 1-64 letters, digits, '.', '_' or '-' with --share, got "
                             f"{args.client_id!r}")


def connect_properties(batch: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = NEVER_EXPIRES
    props.ReceiveMaximum = min(65535, max(100, RECEIVE_FACTOR * batch))
    return props


class Collector:
    """The collector: the MQTT 5 client (and, with a share group, the group's presence and takeovers) feeding
    the batches (batches.py), until stop() or a storage failure."""

    def __init__(self, broker: BrokerSettings, db: str, prefix: str, *, client_id: str = DEFAULT_CLIENT_ID,
                 share: str | None = None, batch: int = BATCH, batch_ms: float = BATCH_MS):
        paho("collect", "central")          # a missing paho-mqtt is said before the database is opened
        self.broker, self.db, self.prefix = broker, db, prefix.strip("/")
        self.client_id, self.share, self.batch, self.batch_ms = client_id, share, batch, batch_ms
        self.stopping = threading.Event()
        self.batcher: Batcher | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Collector":
        with reported(ValueError, MissingExtra, OSError):
            check_args(args)
            return cls(broker_settings(args), args.db, args.prefix, client_id=args.client_id or DEFAULT_CLIENT_ID,
                       share=args.share, batch=args.batch, batch_ms=args.batch_ms)

    def stop(self, *_signal) -> None:
        """What is pending is stored and acknowledged, then run() returns (a signal handler)."""
        self.stopping.set()
        if self.batcher is not None:
            self.batcher.stop()

    def _client(self, client_id: str, reconnect: bool = True):
        return new_client(self.broker, client_id, mqtt5=True, needed_by="collect", extra="central",
                          manual_ack=True, reconnect_on_failure=reconnect)

    def run(self) -> int:
        """Collect until stopped (exit 0) or storing fails (exit 3); CommandError: the database cannot be opened."""
        storage = open_with_retry(self.db, self.stopping)
        if storage is None:
            return EXIT_OK
        store = BatchStore(storage, self.prefix)
        self.batcher = batcher = Batcher(store, self.batch, self.batch_ms)
        if self.stopping.is_set():
            batcher.stop()
        try:
            self._collect(store, batcher)
        finally:
            c = store.counts
            log.info("stopped: %d result(s) stored, %d duplicate(s), %d conflict(s), %d rejected", c["stored"],
                     c["duplicate"], c["conflict"], c["rejected"])
            store.close()
        return EXIT_STORAGE if batcher.failed else EXIT_OK

    def _no_session(self, connection: int, store: BatchStore) -> None:
        """Said loudly: a reconnect that finds no session lost what was queued in it; a first connection that
        finds none is normal for a new collector, and worth a warning when the database already holds results."""
        if connection > 1:
            _say_no_session(self.client_id, reconnect=True)
            return
        try:
            held = store.storage.counts()["results"]
        except (StorageError, sqlite3.Error, OSError):
            held = 0
        if held:
            _say_no_session(self.client_id, reconnect=False)

    def _collect(self, store: BatchStore, batcher: Batcher) -> None:
        from paho.mqtt.subscribeoptions import SubscribeOptions

        client = self._client(self.client_id)
        link = Link(client)
        props = connect_properties(self.batch)
        results = f"{self.prefix}/+/result"
        topics = [(f"$share/{self.share}/{results}" if self.share else results, SubscribeOptions(qos=1)),
                  (f"{self.prefix}/+/status", SubscribeOptions(qos=1))]
        presence = None
        if self.share:
            presence = Presence(self.share, self.client_id, self.prefix, batcher, topics,
                                lambda cid: self._client(cid, reconnect=False),
                                lambda cl: connect(cl, self.broker, clean_start=False, properties=props),
                                own_connected=client.is_connected)
            presence.announce_on(client)        # the last will, before connecting
            topics.append((presence.filter, SubscribeOptions(qos=1)))

        connections = [0]

        def on_connect(cl, userdata, flags, reason, properties):
            if reason.is_failure:
                log.warning("broker refused the connection: %s", reason)
                return
            connections[0] += 1
            if not flags.session_present:
                self._no_session(connections[0], store)
            link.new_connection()
            cl.subscribe(topics)
            if presence:
                presence.online(cl)
            log.info("collecting %s from %s:%d into %s (batches of %d or %g ms%s)", topics[0][0], self.broker.host,
                     self.broker.port, redact(self.db), self.batch, self.batch_ms,
                     f", group {self.share} as {self.client_id}" if self.share else "")

        def on_disconnect(cl, userdata, flags, reason, properties):
            link.new_connection()               # acknowledgements of this connection are void from now on

        def on_message(cl, userdata, msg):
            topic = message_topic(msg)
            if presence and presence.handles(cl, topic, msg):
                return
            batcher.add(Message(topic, msg.payload, store.check(topic, msg.payload), link, msg.mid, msg.qos,
                                link.generation))

        client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
        connect(client, self.broker, clean_start=False, properties=props)
        client.loop_start()
        try:
            while True:
                batch = batcher.next_batch(poll_s=0.2)
                if batch and not batcher.flush(batch):
                    break
                if presence:
                    presence.poll()
                if batcher.stopping and not batch:
                    break                       # everything pending was stored (next_batch empties it when stopping)
        finally:
            if presence:
                presence.close(client)
            client.disconnect()
            client.loop_stop()


def _say_no_session(client_id: str, reconnect: bool) -> None:
    what = ("the broker had no session for it on reconnecting" if reconnect else
            "the broker has no session for it, and the database already holds results")
    (log.error if reconnect else log.warning)(
        "client id %s: %s: results queued for this collector while it was away are LOST (another client took its "
        "client id with a clean start, the broker lost its state, or the session expired); see docs/security.md",
        client_id, what)


def open_with_retry(db: str, stop: threading.Event) -> Storage | None:
    """open_storage, waiting for a database that is not up yet (StorageError retry=True); None: a stop request
    came first. CommandError: an error that waiting does not mend."""
    delay, said = RETRY_FIRST_S, False
    while True:
        try:
            return open_storage(db)
        except StorageError as exc:
            if not exc.retry:
                raise CommandError(str(exc)) from exc
            if not said:
                log.warning("database unavailable (%s); waiting for it", exc)
                said = True
        except (ValueError, RuntimeError, sqlite3.Error, OSError) as exc:
            raise CommandError(str(exc)) from exc
        if stop.wait(delay):
            return None
        delay = min(delay * 2, RETRY_MAX_S)


def main(argv: list[str] | None = None) -> int:
    def collect(args: argparse.Namespace) -> int:
        collector = Collector.from_args(args)
        signal.signal(signal.SIGTERM, collector.stop)
        signal.signal(signal.SIGINT, collector.stop)
        return collector.run()

    return run_command(PROG, build_parser(), collect, argv)


if __name__ == "__main__":
    sys.exit(main())
