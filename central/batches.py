"""Messages stored in batches, each acknowledged to the broker only after its batch is committed
(collector.py's Collector wires it to MQTT; takeover.py feeds it from a taken-over session too).

A message is checked as it arrives (in paho's network thread: BatchStore.check) and waits in the Batcher; the
main thread takes a batch when --batch messages wait or the oldest has waited --batch-ms, stores it
(BatchStore.store: its results in one transaction, Storage.add_results, then its statuses and dead letters one by
one), and only then acknowledges every message of the batch, in arrival order, on the connection it came through
(Link). A value the database refuses as data (StorageError.refused) is that message's fault: the batch is stored
again message by message and the refused one becomes a dead letter with the reason, so no message can stop the
collector. A storage failure worth retrying (StorageError.retry: a PostgreSQL server restarting) keeps the batch
unacknowledged and retries it with a capped backoff; any other stops the collector without acknowledging.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from edge_runtime.fleet.messages import Rejected, Result, parse_bundle_state, parse_result, parse_status
from central.storage import Storage, StorageError

log = logging.getLogger("edge_inspect.collect")

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0


@dataclass
class Status:
    board: str
    status: str
    bundles: dict | None


@dataclass
class Message:
    """One message waiting to be stored and then acknowledged to the client (connection) it came through."""
    topic: str
    payload: bytes
    checked: Result | Status | str          # a result, a status, or the reason it is rejected
    link: "Link"
    mid: int
    qos: int
    generation: int                         # of the link's connection: an ack is only valid on that connection
    done: bool = field(default=False)       # stored (a retried batch stores only what is not)


class Link:
    """A paho client and its connection generation. An acknowledgement must go out on the connection the message
    came through: after a reconnect the broker delivers unacknowledged messages again, with new packet ids that
    an old id could wrongly acknowledge (losing a message not yet stored)."""

    def __init__(self, client):
        self.client = client
        self.generation = 0
        self.acked = 0
        self.lock = threading.Lock()

    def new_connection(self) -> None:
        with self.lock:
            self.generation += 1

    def ack(self, msg: Message) -> bool:
        with self.lock:
            if msg.generation != self.generation:
                return False
            self.client.ack(msg.mid, msg.qos)
            self.acked += 1
            return True


class BatchStore:
    """What each message becomes (check), and storing a batch of them in the storage (store)."""

    def __init__(self, storage: Storage, prefix: str):
        self.prefix = prefix.strip("/")
        self.storage = storage
        self.counts: Counter = Counter()        # stored, duplicate, conflict, status, rejected

    @property
    def stored(self) -> int:
        return self.counts["stored"]

    def check(self, topic: str, payload: bytes) -> Result | Status | str:
        """A Result, a Status, or why the message is rejected (never raises: no message stops the collector)."""
        try:
            parts = topic.split("/")
            if len(parts) < 3 or "/".join(parts[:-2]) != self.prefix or parts[-1] not in ("result", "status"):
                raise Rejected(f"not a topic of the form {self.prefix}/BOARD/result or /status")
            board, kind = parts[-2], parts[-1]
            if kind == "status":
                return Status(board, parse_status(board, payload), parse_bundle_state(payload))
            return parse_result(board, payload)
        except Rejected as exc:
            return str(exc)
        except Exception as exc:            # a bug in the checks must not stop the collector either
            log.exception("%a: unexpected error while checking a message", topic[:200])
            return f"internal error while checking: {type(exc).__name__}"

    def store(self, batch: list[Message]) -> None:
        """Store what is not yet stored: the results in one transaction, then statuses and dead letters one by
        one; a message holding a value the database refuses goes to the dead letters instead. Raises
        StorageError (or sqlite3.Error/OSError) with the batch's remaining messages not done."""
        try:
            self._store(batch)
        except StorageError as exc:
            if not exc.refused:
                raise
            log.warning("the database refused a value in a batch of %d message(s) (%s); storing them one by one",
                        len(batch), exc)
            for m in batch:
                if m.done:
                    continue
                try:
                    self._store([m])
                except StorageError as one:
                    if not one.refused:
                        raise
                    m.checked = f"refused by the database: {one}"
                    self._store([m])

    def _store(self, batch: list[Message]) -> None:
        results = [m for m in batch if not m.done and isinstance(m.checked, Result)]
        if results:
            for m, outcome in zip(results, self.storage.add_results([m.checked for m in results])):
                self.counts[outcome] += 1
                m.done = True
                if outcome == "conflict":
                    log.warning("%a: a result with this board and id is stored with other content; kept in "
                                "fleet_conflicts", m.topic[:200])
        for m in batch:
            if m.done:
                continue
            if isinstance(m.checked, Status):
                self.storage.set_status(m.checked.board, m.checked.status)
                if m.checked.bundles is not None:   # the board's bundles (issue 20: rollouts)
                    self.storage.set_bundle_state(m.checked.board, m.checked.bundles)
                self.counts["status"] += 1
            else:
                self.storage.add_dead_letter(m.topic, m.payload, m.checked)
                self.counts["rejected"] += 1
                log.warning("%a: rejected (%s); kept in fleet_dead_letters", m.topic[:200], m.checked)
            m.done = True

    def close(self) -> None:
        self.storage.close()


class Batcher:
    """Messages from paho's threads, stored and acknowledged by the main thread in batches."""

    def __init__(self, store: BatchStore, batch: int, batch_ms: float):
        self.store, self.batch, self.wait_s = store, batch, batch_ms / 1000
        self.cond = threading.Condition()
        self.pending: list[tuple[float, Message]] = []
        self.stopping = False
        self.failed: BaseException | None = None

    def add(self, msg: Message) -> None:
        with self.cond:
            self.pending.append((time.monotonic(), msg))
            if len(self.pending) >= self.batch:
                self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def next_batch(self, poll_s: float) -> list[Message]:
        """What is due (a full batch, or the oldest message waited --batch-ms; at most --batch messages, the rest
        waits for the next call), else [] after at most poll_s."""
        with self.cond:
            end = time.monotonic() + poll_s
            while not self.stopping:
                now = time.monotonic()
                if len(self.pending) >= self.batch or (self.pending and now - self.pending[0][0] >= self.wait_s):
                    break
                due = self.pending[0][0] + self.wait_s if self.pending else end
                if now >= end:
                    return []
                self.cond.wait(max(0.0, min(due, end) - now))
            batch, self.pending = self.pending[:self.batch], self.pending[self.batch:]
            return [m for _, m in batch]

    def flush(self, batch: list[Message]) -> bool:
        """Store the batch (retrying while the database is away) and acknowledge it. False: a storage failure
        not worth retrying (self.failed), nothing of the batch acknowledged."""
        delay, down_since = RETRY_FIRST_S, None
        while True:
            try:
                self.store.store(batch)
                break
            except (StorageError, sqlite3.Error, OSError) as exc:
                if not getattr(exc, "retry", False):
                    log.error("storage failed (%s); stopping without acknowledging: the broker keeps the message",
                              exc)
                    self.failed = exc
                    return False
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("database unavailable (%s); %d message(s) kept unacknowledged, retrying every "
                                "%.1f-%.0f s", exc, sum(not m.done for m in batch), RETRY_FIRST_S, RETRY_MAX_S)
                with self.cond:             # a stop request ends the wait (the batch stays with the broker)
                    if not self.stopping:
                        self.cond.wait(delay)
                    if self.stopping:
                        log.warning("stopping while the database is unavailable: %d message(s) left "
                                    "unacknowledged with the broker", len(batch))
                        return True
                delay = min(delay * 2, RETRY_MAX_S)
        if down_since is not None:
            log.info("database back after %.1f s; storing again", time.monotonic() - down_since)
        for m in batch:
            m.link.ack(m)                   # a message of an older connection is delivered again: not acked
        return True


def message_topic(msg) -> str:
    try:
        return msg.topic
    except UnicodeDecodeError:          # brokers refuse such topics; never trust that
        return bytes(getattr(msg, "_topic", b"")).decode("utf-8", "backslashreplace")
