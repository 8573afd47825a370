"""The central collector (`python -m central`) as a real process against a real Mosquitto: each
result stored once, no payload can stop it (issue 19: a fuzz of valid, duplicate, conflicting and malformed
messages), rejected ones kept as dead letters, conflicting duplicates recorded, acknowledgements only after the
commit, and the shipped broker ACL confining each board to its own topics."""
from __future__ import annotations

import json
import random
import sqlite3
import threading
import time

from tests.support.collector import PREFIX, Collector, publish, publisher
from tests.support.messages import fuzz_messages, valid_result
from tests.support.mosquitto import Broker, needs_mosquitto, paho
from tests.support.paths import REPO
from tests.support.waiting import wait_until

mqtt = paho()

pytestmark = needs_mosquitto


def test_collect_gathers_boards_once_each(broker, tmp_path):
    c = Collector(broker.port, tmp_path / "central.sqlite3", tmp_path / "collect.log")
    pub = publisher(broker.port)
    try:
        rng = random.Random(1)
        a1, a2, b1 = valid_result("board-a", 1, rng), valid_result("board-a", 2, rng), valid_result("board-b", 1, rng)
        for board, msg in (("board-a", a1), ("board-a", a2), ("board-a", a1), ("board-b", b1)):
            publish(pub, f"{PREFIX}/{board}/result", json.dumps(msg).encode())
        impostor = {**a2, "name": "forged.png"}              # same key, other content: recorded, not stored
        publish(pub, f"{PREFIX}/board-a/result", json.dumps(impostor).encode())
        publish(pub, f"{PREFIX}/board-a/result", b"{not json")
        publish(pub, f"{PREFIX}/board-b/status", b"online")
        wait_until(lambda: c.counts() == {"results": 3, "dead_letters": 1, "conflicts": 1},
                   120, lambda: (c.counts(), c.log.read_text()))
        assert c.rows("SELECT board, id, name FROM fleet_results ORDER BY board, id") == \
            [("board-a", 1, a1["name"]), ("board-a", 2, a2["name"]), ("board-b", 1, b1["name"])]
        assert c.rows("SELECT board, result_id, json_extract(payload, '$.name') FROM fleet_conflicts") == \
            [("board-a", 2, "forged.png")]
        wait_until(lambda: c.rows("SELECT board, status FROM fleet_boards") == [("board-b", "online")],
                   describe=lambda: c.rows("SELECT board, status FROM fleet_boards"))
        (topic, reason, payload), = c.rows("SELECT topic, reason, payload FROM fleet_dead_letters")
        assert topic == f"{PREFIX}/board-a/result" and "not valid JSON" in reason and payload == b"{not json"
        assert c.stop() == 0
        assert "3 result(s) stored, 1 duplicate(s), 1 conflict(s), 1 rejected" in c.log.read_text()
    finally:
        pub.loop_stop()
        c.stop()


def test_no_payload_stops_the_collector(broker, tmp_path):
    """200 payloads of every kind issue 19 lists (UTF-16 JSON, surrogates as UTF-8 bytes, ids beyond 64 bits,
    missing fields, wrong types, an 8 MB payload, ...) among valid ones, duplicates and conflicts. Before: the
    first such message raised inside paho's callback, the collector died unacknowledged and crash-looped on the
    redelivery. Now it stays up, stores every valid result exactly once, keeps every rejected message as a dead
    letter, and after a restart nothing comes back (everything was acknowledged)."""
    fuzz = fuzz_messages(200, seed=7)
    c = Collector(broker.port, tmp_path / "central.sqlite3", tmp_path / "collect.log")
    pub = publisher(broker.port)
    try:
        for topic, payload in fuzz["messages"]:
            publish(pub, topic, payload)
        wait_until(lambda: c.counts() == fuzz["expected"],
                   240, lambda: (c.counts(), fuzz["expected"], c.log.read_text()[-3000:]))
        assert c.proc.poll() is None
        stored = {(b, i): json.loads(p) for b, i, p in c.rows("SELECT board, id, payload FROM fleet_results")}
        assert stored == fuzz["valid"]
        sizes = [n for (n,) in c.rows("SELECT size FROM fleet_dead_letters")]
        assert max(sizes) > 8 * 2**20 and len(c.rows("SELECT 1 FROM fleet_dead_letters WHERE length(payload) "
                                                      "> 65536")) == 0       # the 8 MB one: its head is kept
        assert c.stop() == 0
        c = Collector(broker.port, tmp_path / "central.sqlite3", tmp_path / "collect.log")
        time.sleep(1.5)
        assert c.proc.poll() is None and c.counts() == fuzz["expected"], "nothing is delivered again"
        publish(pub, f"{PREFIX}/board-z/result", json.dumps(valid_result("board-z", 5, random.Random(2))).encode())
        wait_until(lambda: c.counts()["results"] == fuzz["expected"]["results"] + 1, 120, lambda: c.counts()["results"])
    finally:
        pub.loop_stop()
        c.stop()


def test_a_message_is_acknowledged_only_after_its_row_is_committed(broker, tmp_path):
    """The database is locked by another writer: the store fails, the collector stops (exit 3) without
    acknowledging, and the broker delivers the message again to the next collector, which stores it once."""
    db = tmp_path / "central.sqlite3"
    c = Collector(broker.port, db, tmp_path / "collect.log")
    pub = publisher(broker.port)
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        msg = valid_result("board-a", 42, random.Random(3))
        publish(pub, f"{PREFIX}/board-a/result", json.dumps(msg).encode())
        assert c.proc.wait(30) == 3, c.log.read_text()
        assert "without acknowledging" in c.log.read_text()
        lock.execute("ROLLBACK")
        c = Collector(broker.port, db, tmp_path / "collect.log")
        wait_until(lambda: c.counts().get("results") == 1, 120, lambda: c.log.read_text())
        assert c.rows("SELECT board, id FROM fleet_results") == [("board-a", 42)]
    finally:
        lock.close()
        pub.loop_stop()
        c.stop()


def test_the_shipped_acl_confines_each_board(tmp_path):
    """deploy/mosquitto-acl.conf on a real Mosquitto with passwords: board-a's credentials cannot publish under
    board-b's topic (before: the collector kept whichever came first, so a forged result replaced board-b's),
    and cannot read other boards' messages; the collector reads all."""
    users = {"board-a": "pw-a-123", "board-b": "pw-b-456", "collector": "pw-c-789", "rollout": "pw-r-000"}
    acl = REPO / "deploy" / "mosquitto-acl.conf"
    assert acl.is_file(), "the broker ACL ships in deploy/"
    b = Broker(tmp_path / "broker", passwords=users, acl=acl)
    b.start()
    (tmp_path / "collector.pw").write_text(users["collector"])
    c = Collector(b.port, tmp_path / "central.sqlite3", tmp_path / "collect.log", "--username", "collector",
                  "--password-file", str(tmp_path / "collector.pw"))
    board_a = publisher(b.port, "board-a", ("board-a", users["board-a"]))
    board_b = publisher(b.port, "board-b", ("board-b", users["board-b"]))
    seen_by_a, subscribed = [], threading.Event()
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="board-a-spy")
    spy.username_pw_set("board-a", users["board-a"])
    spy.on_message = lambda cl, u, m: seen_by_a.append(m.topic)
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.connect("127.0.0.1", b.port)
    spy.subscribe(f"{PREFIX}/#", qos=1)
    spy.loop_start()
    try:
        assert subscribed.wait(60)
        rng = random.Random(4)
        forged = valid_result("board-b", 7, rng)
        forged["name"] = "forged-by-a.png"
        publish(board_a, f"{PREFIX}/board-b/result", json.dumps(forged).encode())        # not allowed
        own_a, real_b = valid_result("board-a", 7, rng), valid_result("board-b", 7, rng)
        publish(board_a, f"{PREFIX}/board-a/result", json.dumps(own_a).encode())
        publish(board_b, f"{PREFIX}/board-b/result", json.dumps(real_b).encode())
        wait_until(lambda: c.counts().get("results") == 2, 120, lambda: c.log.read_text())
        time.sleep(0.5)
        assert c.rows("SELECT board, id, name FROM fleet_results ORDER BY board") == \
            [("board-a", 7, own_a["name"]), ("board-b", 7, real_b["name"])]
        assert c.counts() == {"results": 2, "dead_letters": 0, "conflicts": 0}
        assert seen_by_a == [], "a board reads no other board's messages"
        # Rollouts (issue 20): only the rollout user writes a board's rollout topic, which that board reads; the
        # rollout user cannot write results.
        operator = publisher(b.port, "rollout-cli", ("rollout", users["rollout"]))
        publish(board_a, f"{PREFIX}/board-a/rollout", b'{"action": "rollback", "id": "by-the-board"}')  # dropped
        publish(operator, f"{PREFIX}/board-a/rollout", b'{"action": "rollback", "id": "by-the-operator"}')
        publish(operator, f"{PREFIX}/board-a/result", json.dumps(valid_result("board-a", 8, rng)).encode())
        wait_until(lambda: seen_by_a == [f"{PREFIX}/board-a/rollout"], describe=lambda: seen_by_a)
        time.sleep(0.5)
        assert seen_by_a == [f"{PREFIX}/board-a/rollout"] and c.counts()["results"] == 2
        operator.loop_stop()
    finally:
        spy.loop_stop()
        board_a.loop_stop()
        board_b.loop_stop()
        c.stop()
        b.stop()
