"""A value the database refuses is that one message's fault (central/batches.py BatchStore.store): the batch is
stored again message by message, the refused message becomes a dead letter with the reason, every other message
of the batch is stored, and nothing raises (no message stops the collector). Real SQLite storage; the refusal
comes from a storage that refuses one result the way PostgreSQL refuses a data error."""
from __future__ import annotations

import json

import pytest

from central.batches import BatchStore, Message, Status
from central.rows import StorageError
from central.storage import open_storage
from edge_runtime.fleet.messages import parse_bundle_state, parse_result


class RefusingStorage:
    """The real storage, except that a write holding the name "poison.png" or a bundle phase "poison" is refused
    as data (as PostgreSQL's SQLSTATE 22 is)."""

    def __init__(self, real):
        self.real = real

    def add_results(self, results):
        if any(r.columns["name"] == "poison.png" for r in results):
            raise StorageError("PostgreSQL: invalid input (refused)", refused=True)
        return self.real.add_results(results)

    def set_bundle_state(self, board, state):
        if state.get("phase") == "poison":
            raise StorageError("PostgreSQL: invalid input (refused)", refused=True)
        return self.real.set_bundle_state(board, state)

    def __getattr__(self, name):
        return getattr(self.real, name)


def result(rid: int, name: str):
    msg = {"id": rid, "board": "tool-01", "outcome": "inspected", "name": name, "label": "clean",
           "stage1_score": 0.1, "defect_class": None, "confidence": 0.9, "review": False, "sha256": "ab" * 32,
           "bundle_id": "cd" * 32, "recorded_at": "2026-12-08T10:00:00+00:00", "latency_ms": 2.0}
    return parse_result("tool-01", json.dumps(msg).encode())


def message(topic: str, checked) -> Message:
    return Message(topic, b"{}", checked, link=None, mid=1, qos=1, generation=0)


def test_a_refused_message_is_a_dead_letter_and_the_rest_of_its_batch_is_stored(tmp_path):
    real = open_storage(str(tmp_path / "central.sqlite3"))
    store = BatchStore(RefusingStorage(real), "sem-inspect")
    poisoned_status = parse_bundle_state(json.dumps({"status": "online", "bundle": {
        "current": "ef" * 32, "phase": "poison"}}).encode())
    batch = [message("sem-inspect/tool-01/result", result(1, "a.png")),
             message("sem-inspect/tool-01/result", result(2, "poison.png")),
             message("sem-inspect/tool-01/result", result(3, "c.png")),
             message("sem-inspect/tool-02/status", Status("tool-02", "online", poisoned_status)),
             message("sem-inspect/tool-03/status", Status("tool-03", "online", None))]
    store.store(batch)
    assert all(m.done for m in batch)
    assert sorted(r["id"] for r in real.query("SELECT id FROM fleet_results")) == [1, 3]
    letters = real.query("SELECT topic, reason FROM fleet_dead_letters ORDER BY id")
    assert [d["topic"] for d in letters] == ["sem-inspect/tool-01/result", "sem-inspect/tool-02/status"]
    assert all(d["reason"].startswith("refused by the database") for d in letters)
    assert [b["board"] for b in real.query("SELECT board FROM fleet_boards ORDER BY board")] == ["tool-02", "tool-03"]
    assert store.counts["stored"] == 2 and store.counts["rejected"] == 2
    real.close()


def test_a_storage_failure_that_is_not_a_refusal_still_stops_the_batch(tmp_path):
    real = open_storage(str(tmp_path / "central.sqlite3"))

    class Down(RefusingStorage):
        def add_results(self, results):
            raise StorageError("PostgreSQL: connection lost", retry=True)

    store = BatchStore(Down(real), "sem-inspect")
    batch = [message("sem-inspect/tool-01/result", result(1, "a.png"))]
    with pytest.raises(StorageError) as exc:       # not the message's fault: the batch waits, nothing dead-lettered
        store.store(batch)
    assert exc.value.retry and not exc.value.refused
    assert not batch[0].done and real.counts()["dead_letters"] == 0
    real.close()
