"""MQTT publishing of the watch service's results (paho-mqtt, the optional `fleet` extra), driven from the store.

Topics (PREFIX = mqtt_prefix, BOARD = board):
    PREFIX/BOARD/result   one JSON object per result (journal.row_to_json plus "board"), QoS 1, not retained
    PREFIX/BOARD/status   {"status": "online", "board", "bundle": {current, candidate, shadow, previous, phase,
                          last_change, error}, "at"} (retained, QoS 1; on connect and whenever the bundles change)
                          / {"status": "offline", "board"} (retained: clean stop, or the broker's last will when the
                          board vanishes)
    PREFIX/BOARD/stats    the service's counters every mqtt_stats_seconds, QoS 0, retained
    PREFIX/BOARD/rollout  subscribed (QoS 1) when the board takes rollouts (bundles_dir): handed to on_rollout
                          (edge_runtime/fleet/rollout_message.py, edge_runtime/service/rollout.py)

Exactly-once stays the store's job. A result is published only after its row is committed; its row is marked
`published` only when the broker acknowledged it (PUBACK). After a broker outage, or a kill -9 between commit
and acknowledgement, the unmarked rows are sent again: at-least-once on the wire, each message carrying the
result's stable "id" (with "board") for consumers to de-duplicate.

Threads: paho's network thread only records acknowledgements (a lock-protected list) and wakes the service;
every database read and write happens in the service's thread, in pump(), called between group commits.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from edge_runtime.config.service_config import ServiceConfig
from edge_runtime.netnames import parse_host_port
from edge_runtime.db.journal import row_to_json
from edge_runtime.db.store import Store
from edge_runtime.exits import utc_now
from edge_runtime.fleet.mqtt import BrokerSettings, connect, new_client

log = logging.getLogger("edge_inspect")

def topics(prefix: str, board: str) -> dict[str, str]:
    base = f"{prefix.strip('/')}/{board}"
    return {"result": f"{base}/result", "status": f"{base}/status", "stats": f"{base}/stats",
            "rollout": f"{base}/rollout"}


def offline(board: str) -> bytes:
    return json.dumps({"status": "offline", "board": board}).encode()


def payload(row: dict, board: str) -> bytes:
    return json.dumps({**row_to_json(row), "board": board}, ensure_ascii=False).encode("utf-8")


class Publisher:
    WINDOW = 200            # results sent but not yet acknowledged, at most (bounded memory)
    KEEPALIVE = 30

    def __init__(self, cfg: ServiceConfig, store: Store, stats_fn=None, wake=None, status_fn=None, on_rollout=None):
        self.store, self.board, self.stats_fn, self.wake = store, cfg.board, stats_fn, wake or (lambda: None)
        self.topics = topics(cfg.mqtt_prefix, cfg.board)
        self.status_fn = status_fn or (lambda: {"status": "online"})
        self.on_rollout = on_rollout
        self.stats_every = cfg.mqtt_stats_seconds
        self.host, self.port = parse_host_port(cfg.mqtt)
        self.broker = BrokerSettings(self.host, self.port, cfg.mqtt_username, cfg.mqtt_password, cfg.mqtt_tls,
                                     cfg.mqtt_ca, keepalive=self.KEEPALIVE)
        self._lock = threading.Lock()
        self._acked: list[int] = []             # mids acknowledged, not yet marked (paho thread -> service)
        self._inflight: dict[int, int] = {}     # mid -> result id (service thread only)
        self._sent_upto = 0                     # highest result id sent since the last (re)connect
        self._generation = 0                    # connections made (paho thread); a change resends the window
        self._seen_generation = 0
        self.connected = False
        self.published = 0
        self.unpublished = 0                    # committed rows not yet acknowledged (after the last pump)
        self._next_stats = time.monotonic() + self.stats_every
        client = new_client(self.broker, f"sem-inspect-{cfg.board}", clean_session=True)
        client.max_inflight_messages_set(self.WINDOW)
        client.will_set(self.topics["status"], offline(cfg.board), qos=1, retain=True)
        if cfg.mqtt_username is not None and cfg.mqtt_username != cfg.board:
            log.warning("mqtt: user name %r is not the board name %r: under the shipped broker ACL "
                        "(deploy/mosquitto-acl.conf) a board may publish only under its user name",
                        cfg.mqtt_username, cfg.board)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client

    # -- paho's thread --------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            log.warning("mqtt: %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        self.publish_status()
        if self.on_rollout is not None:
            client.subscribe(self.topics["rollout"], qos=1)
        with self._lock:
            self.connected = True
            self._generation += 1
        log.info("mqtt: connected to %s:%d, publishing to %s", self.host, self.port, self.topics["result"])
        self.wake()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        with self._lock:
            was, self.connected = self.connected, False
        if was:
            log.warning("mqtt: disconnected from %s:%d (%s); results wait in the database", self.host, self.port,
                        reason)

    def _on_message(self, client, userdata, msg):
        if self.on_rollout is not None and msg.topic == self.topics["rollout"]:
            self.on_rollout(msg.payload)

    def _on_publish(self, client, userdata, mid, reason, properties):
        with self._lock:
            self._acked.append(mid)
        self.wake()

    def publish_status(self) -> None:
        """The retained status with the bundles' state (any thread; paho queues it while disconnected)."""
        doc = {**self.status_fn(), "board": self.board, "at": utc_now()}
        self.client.publish(self.topics["status"], json.dumps(doc, default=str).encode(), qos=1, retain=True)

    # -- the service's thread -------------------------------------------------------------------------
    def start(self) -> None:
        # connect_async + loop_start: a broker that is down at start-up does not stop the service; paho
        # keeps reconnecting in its thread.
        connect(self.client, self.broker)
        self.client.loop_start()

    def pump(self) -> None:
        """Mark what the broker acknowledged, send committed rows not yet sent, the stats when due. Call only
        with no group transaction open (it reads committed rows and writes marks)."""
        with self._lock:
            acked, self._acked = self._acked, []
            connected, generation = self.connected, self._generation
        ids = [self._inflight.pop(mid) for mid in acked if mid in self._inflight]
        if ids:
            self.store.mark_published(ids)
            self.published += len(ids)
        self.unpublished = self.store.count_unpublished()
        if not connected:
            return
        if generation != self._seen_generation:        # (re)connected: resend whatever is not acknowledged
            self._seen_generation, self._sent_upto = generation, 0
            self._inflight.clear()
        room = self.WINDOW - len(self._inflight)
        if room > 0:
            for row in self.store.unpublished(self._sent_upto, room):
                info = self.client.publish(self.topics["result"], payload(row, self.board), qos=1)
                if info.rc != 0:        # lost the connection meanwhile: resent after the reconnect
                    break
                self._inflight[info.mid] = row["id"]
                self._sent_upto = row["id"]
        now = time.monotonic()
        if self.stats_fn and now >= self._next_stats:
            self._next_stats = now + self.stats_every
            self.client.publish(self.topics["stats"], json.dumps({**self.stats_fn(), "board": self.board,
                                                                  "at": utc_now()}).encode(), qos=0, retain=True)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def close(self, drain_seconds: float = 5.0) -> None:
        """Send and wait (at most drain_seconds) for what is not yet acknowledged, mark it, say offline,
        disconnect. What is still unacknowledged then is sent at the next start."""
        deadline = time.monotonic() + drain_seconds
        while True:
            self.pump()
            if not self.unpublished or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if self.unpublished:
            log.warning("mqtt: %d result(s) not acknowledged by %s:%d yet; they are sent at the next start",
                        self.unpublished, self.host, self.port)
        try:
            if self.connected:
                self.client.publish(self.topics["status"], offline(self.board), qos=1,
                                    retain=True).wait_for_publish(2.0)
        except (RuntimeError, ValueError) as exc:
            log.debug("mqtt: offline status not sent: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
