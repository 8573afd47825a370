"""Where the collector keeps what it receives: the Storage interface and its SQLite back-end.

Every method returns only once what it wrote is committed (durable): the collector acknowledges a message to
the broker after that, so a crash loses nothing. A second back-end (e.g. PostgreSQL: the same tables, with
`INSERT ... ON CONFLICT DO NOTHING` and the same comparison for conflicts) implements the same methods
(set_bundle_state and bundle_states came with rollouts: the boards' bundle state, fleet_bundle_state).

SQLite schema:
    CREATE TABLE fleet_results (board TEXT, id INTEGER, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
        defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT, recorded_at TEXT,
        payload TEXT,                 -- the whole message (JSON, as received)
        received_at TEXT, PRIMARY KEY (board, id));
    CREATE TABLE fleet_boards (board TEXT PRIMARY KEY, status TEXT, changed_at TEXT);
    CREATE TABLE fleet_dead_letters (    -- every message that was not stored as a result or a status
        id INTEGER PRIMARY KEY, topic TEXT, reason TEXT,
        payload BLOB,                 -- the bytes as received (the first KEEP_BYTES of a larger one)
        size INTEGER, sha256 TEXT,    -- of the whole payload
        received_at TEXT);
    CREATE TABLE fleet_conflicts (       -- a result whose (board, id) is stored with other content
        id INTEGER PRIMARY KEY, board TEXT, result_id INTEGER, payload TEXT, sha256 TEXT, received_at TEXT,
        UNIQUE (board, result_id, sha256));
    CREATE TABLE fleet_bundle_state (    -- each board's bundles as its latest status reported them (rollouts)
        board TEXT PRIMARY KEY, current TEXT, candidate TEXT, phase TEXT, shadow_images INTEGER, agreement REAL,
        stage1_agreement REAL, error_rate REAL, last_change_at TEXT, last_change TEXT,
        payload TEXT,                 -- the whole status (JSON, as received)
        reported_at TEXT);
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Protocol

from edge_runtime.collect.schema import BUNDLE_STATE_COLUMNS, COLUMNS, Result
from edge_runtime.db.store import utc_now

KEEP_BYTES = 64 * 1024
STORED, DUPLICATE, CONFLICT = "stored", "duplicate", "conflict"

SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_results (
    board TEXT NOT NULL, id INTEGER NOT NULL, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
    defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT, recorded_at TEXT,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (board, id));
CREATE TABLE IF NOT EXISTS fleet_boards (board TEXT PRIMARY KEY, status TEXT NOT NULL, changed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_dead_letters (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_conflicts (
    id INTEGER PRIMARY KEY, board TEXT NOT NULL, result_id INTEGER NOT NULL, payload TEXT NOT NULL,
    sha256 TEXT NOT NULL, received_at TEXT NOT NULL, UNIQUE (board, result_id, sha256));
CREATE TABLE IF NOT EXISTS fleet_bundle_state (
    board TEXT PRIMARY KEY, current TEXT NOT NULL, candidate TEXT, phase TEXT, shadow_images INTEGER, agreement REAL,
    stage1_agreement REAL, error_rate REAL, last_change_at TEXT, last_change TEXT, payload TEXT NOT NULL,
    reported_at TEXT NOT NULL);
"""


class Storage(Protocol):
    def add_result(self, result: Result) -> str:
        """Store a result once per (board, id): STORED; the same content again: DUPLICATE; other content under a
        stored key: recorded as a conflict (the stored result stays), CONFLICT."""

    def add_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        """Keep a message that was not stored, with the reason."""

    def set_status(self, board: str, status: str) -> None:
        """A board's latest status."""

    def set_bundle_state(self, board: str, state: dict) -> None:
        """A board's bundles as it reported them (schema.parse_bundle_state), replacing the previous report."""

    def bundle_states(self) -> list[dict]:
        """Every board's latest bundle report, by board."""

    def counts(self) -> dict[str, int]:
        """Rows per table: results, boards, dead_letters, conflicts."""

    def close(self) -> None:
        ...


def _text(value: str) -> str:
    """Text any database takes (a topic with lone surrogates or NUL cannot be stored as it is)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\x00")


class SQLiteStorage:
    """Storage in one SQLite file (WAL, each commit synced)."""

    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def add_result(self, result: Result) -> str:
        now = utc_now()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute(
                f"INSERT OR IGNORE INTO fleet_results (board, id, {', '.join(COLUMNS)}, payload, received_at) "
                f"VALUES ({', '.join('?' * (len(COLUMNS) + 4))})",
                (result.board, result.id, *[result.columns[c] for c in COLUMNS], result.payload, now))
            outcome = STORED
            if cur.rowcount == 0:
                (stored,) = self.db.execute("SELECT payload FROM fleet_results WHERE board = ? AND id = ?",
                                            (result.board, result.id)).fetchone()
                outcome = DUPLICATE if json.loads(stored) == result.message else CONFLICT
                if outcome == CONFLICT:
                    digest = hashlib.sha256(result.payload.encode("utf-8")).hexdigest()
                    self.db.execute("INSERT OR IGNORE INTO fleet_conflicts (board, result_id, payload, sha256, "
                                    "received_at) VALUES (?, ?, ?, ?, ?)",
                                    (result.board, result.id, result.payload, digest, now))
            self.db.execute("COMMIT")
            return outcome
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def add_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        self.db.execute("INSERT INTO fleet_dead_letters (topic, reason, payload, size, sha256, received_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (_text(topic), _text(reason), bytes(payload[:KEEP_BYTES]), len(payload),
                         hashlib.sha256(payload).hexdigest(), utc_now()))

    def set_status(self, board: str, status: str) -> None:
        self.db.execute("INSERT INTO fleet_boards VALUES (?, ?, ?) ON CONFLICT(board) DO UPDATE SET "
                        "status = excluded.status, changed_at = excluded.changed_at", (board, status, utc_now()))

    def set_bundle_state(self, board: str, state: dict) -> None:
        cols = ("board", *BUNDLE_STATE_COLUMNS, "payload", "reported_at")
        values = {**state, "board": board, "reported_at": utc_now()}
        self.db.execute(f"INSERT OR REPLACE INTO fleet_bundle_state ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [values[c] for c in cols])

    def bundle_states(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM fleet_bundle_state ORDER BY board")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def counts(self) -> dict[str, int]:
        return {name: self.db.execute(f"SELECT count(*) FROM fleet_{name}").fetchone()[0]
                for name in ("results", "boards", "dead_letters", "conflicts")}

    def close(self) -> None:
        self.db.close()


def open_storage(path: str | Path) -> Storage:
    """The storage behind --db (a SQLite file; another back-end would be chosen here)."""
    return SQLiteStorage(path)
