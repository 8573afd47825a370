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
import signal
import sqlite3
import sys
import threading
from pathlib import Path

from central.batches import RETRY_FIRST_S, RETRY_MAX_S, Batcher, Collector, Link, Message, message_topic
from central.storage import Storage, StorageError, open_storage
from central.takeover import Presence
from edge_runtime.netnames import parse_host_port
from edge_runtime.extras import MissingExtra, need

log = logging.getLogger("edge_inspect.collect")

EXIT_STORAGE = 3
# Measured (20,000 queued results, one collector, 2 shared cores): into PostgreSQL 1,100 results/s one per
# transaction, 6,100 / 6,900 / 7,800 with batches of 100 / 500 / 2,000: past a few hundred the parsing, not the
# commit, is the limit, and a larger batch only adds delay when the stream is slow.
BATCH, BATCH_MS = 500, 100
RECEIVE_FACTOR = 4                  # batches in flight: the next ones arrive while one commits
NEVER_EXPIRES = 0xFFFFFFFF          # MQTT 5 Session Expiry Interval: the session outlives any outage


def redact(db: str) -> str:
    """--db for the log: a URL's password hidden."""
    return re.sub(r"^([a-z]+://[^:/@]+):[^@/]*@", r"\1:***@", db)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m central",
                                description="Gather every board's results from the MQTT broker into one database.")
    p.add_argument("--broker", required=True, metavar="HOST:PORT")
    p.add_argument("--db", required=True, metavar="PATH|URL",
                   help="central SQLite file (created), or postgresql://USER@HOST/DB (psycopg 3: "
                        "pip install \"sem-inspect[central]\")")
    p.add_argument("--prefix", default="sem-inspect", help="the boards' mqtt_prefix (default: sem-inspect)")
    p.add_argument("--client-id", help="persistent-session id, one per collector (default: sem-inspect-collect; "
                                       "required with --share)")
    p.add_argument("--share", metavar="GROUP",
                   help="share the results with the other collectors of GROUP (MQTT 5 shared subscription)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"store at most this many messages a transaction "
                                                            f"(default {BATCH})")
    p.add_argument("--batch-ms", type=float, default=BATCH_MS,
                   help=f"store what waits after this many milliseconds (default {BATCH_MS})")
    p.add_argument("--username")
    p.add_argument("--password-file", help="file holding the password (not on the command line)")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--ca", help="CA certificate file for --tls")
    return p


def check_args(args) -> None:
    """ValueError (one line) for options that cannot work."""
    if not 1 <= args.batch <= 10_000:
        raise ValueError(f"--batch must be 1..10000, got {args.batch}")
    if not 0 <= args.batch_ms <= 60_000:
        raise ValueError(f"--batch-ms must be 0..60000, got {args.batch_ms:g}")
    if args.share is not None:         # both become topic levels (takeover.py: the group's presence)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.share):
            raise ValueError(f"--share must be 1-64 letters, digits, '.', '_' or '-', got {args.share!r}")
        if not args.client_id:
            raise ValueError("--share needs a --client-id of its own for each collector of the group")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.client_id):
            raise ValueError(f"--client-id must be 1-64 letters, digits, '.', '_' or '-' with --share, got "
                             f"{args.client_id!r}")


def connect_properties(batch: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = NEVER_EXPIRES
    props.ReceiveMaximum = min(65535, max(100, RECEIVE_FACTOR * batch))
    return props


def new_client(mqtt, client_id: str, args, password: str | None, reconnect: bool = True):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=True, reconnect_on_failure=reconnect)
    if args.username:
        client.username_pw_set(args.username, password)
    if args.tls:
        client.tls_set(ca_certs=args.ca)
    client.reconnect_delay_set(1, 30)
    return client


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_args(args)
        host, port = parse_host_port(args.broker)
        mqtt = need("paho.mqtt.client", "collect", "paho-mqtt", "central")
        password = Path(args.password_file).read_text().strip() if args.password_file else None
    except (ValueError, MissingExtra, OSError) as exc:
        print(f"collect: error: {exc}", file=sys.stderr)
        return 2
    from paho.mqtt.subscribeoptions import SubscribeOptions

    client_id = args.client_id or "sem-inspect-collect"
    stop, running = threading.Event(), []

    def on_signal(*_):
        stop.set()
        for b in running:
            b.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    storage = open_with_retry(args.db, stop)
    if storage is None:
        return 0 if stop.is_set() else 2
    collector = Collector(storage, args.prefix)
    batcher = Batcher(collector, args.batch, args.batch_ms)
    running.append(batcher)
    if stop.is_set():
        batcher.stop()
    client = new_client(mqtt, client_id, args, password)
    link = Link(client)
    props = connect_properties(args.batch)
    results = f"{collector.prefix}/+/result"
    topics = [(f"$share/{args.share}/{results}" if args.share else results, SubscribeOptions(qos=1)),
              (f"{collector.prefix}/+/status", SubscribeOptions(qos=1))]
    presence = None
    if args.share:
        presence = Presence(args.share, client_id, collector.prefix, batcher, topics,
                            lambda cid: new_client(mqtt, cid, args, password, reconnect=False),
                            lambda cl: cl.connect_async(host, port, clean_start=False, properties=props))
        presence.announce_on(client)        # the last will, before connecting
        topics.append((presence.filter, SubscribeOptions(qos=1)))

    def on_connect(cl, userdata, flags, reason, properties):
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        link.new_connection()
        cl.subscribe(topics)
        if presence:
            presence.online(cl)
        log.info("collecting %s from %s:%d into %s (batches of %d or %g ms%s)", topics[0][0], host, port,
                 redact(args.db), args.batch, args.batch_ms, f", group {args.share} as {client_id}"
                 if args.share else "")

    def on_disconnect(cl, userdata, flags, reason, properties):
        link.new_connection()               # acknowledgements of this connection are void from now on

    def on_message(cl, userdata, msg):
        topic = message_topic(msg)
        if presence and presence.handles(cl, topic, msg):
            return
        batcher.add(Message(topic, msg.payload, collector.check(topic, msg.payload), link, msg.mid, msg.qos,
                            link.generation))

    client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message
    client.connect_async(host, port, clean_start=False, properties=props)
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
        c = collector.counts
        log.info("stopped: %d result(s) stored, %d duplicate(s), %d conflict(s), %d rejected", c["stored"],
                 c["duplicate"], c["conflict"], c["rejected"])
        collector.close()
    return EXIT_STORAGE if batcher.failed else 0


def open_with_retry(db: str, stop: threading.Event) -> Storage | None:
    """open_storage, waiting for a database that is not up yet (StorageError retry=True); None: gave up (a stop
    request, or an error that waiting does not mend: said in one line)."""
    delay, said = RETRY_FIRST_S, False
    while True:
        try:
            return open_storage(db)
        except StorageError as exc:
            if not exc.retry:
                print(f"collect: error: {exc}", file=sys.stderr)
                return None
            if not said:
                log.warning("database unavailable (%s); waiting for it", exc)
                said = True
        except (ValueError, RuntimeError, sqlite3.Error, OSError) as exc:
            print(f"collect: error: {exc}", file=sys.stderr)
            return None
        if stop.wait(delay):
            return None
        delay = min(delay * 2, RETRY_MAX_S)
