"""Where the collector keeps what it receives: the Storage interface, its SQLite back-end (the embedded default)
and open_storage, which picks the back-end from --db: `postgresql://...` or `postgres://...` -> PostgreSQL
(postgres.py; psycopg 3 from the `central` extra: pip install "sem-inspect[central]"), anything else -> a SQLite
file. What a row holds, the duplicate/conflict rule, the schema version and the indexes are decided once, in
rows.py, for both back-ends.

Every write returns only once what it wrote is committed (durable): the collector acknowledges a message to
the broker after that, so a crash loses nothing. A failure that is not the message's fault raises StorageError
(retry=True where trying again may succeed: a PostgreSQL connection lost; SQLite: always False). Each back-end
creates its tables and migrates older ones when opened (fleet_schema holds the version; a SQLite file made
before it, version 0, keeps its rows). A Storage may be shared by threads (one lock per storage).

Tables (the same names and columns on both back-ends; PostgreSQL: BIGINT, DOUBLE PRECISION, BYTEA):
    fleet_results (board TEXT, id INTEGER, name TEXT, label TEXT, outcome TEXT, stage1_score REAL,
        defect_class TEXT, confidence REAL, review INTEGER, sha256 TEXT, bundle_id TEXT,
        recorded_at TEXT,             -- UTC, YYYY-MM-DDTHH:MM:SS.fff+00:00 (rows.py); the payload keeps the original
        payload TEXT,                 -- the whole message (JSON, as received)
        received_at TEXT, PRIMARY KEY (board, id));
        indexes (board, recorded_at), (recorded_at, label), (bundle_id, recorded_at)
    fleet_boards (board TEXT PRIMARY KEY, status TEXT, changed_at TEXT);
    fleet_dead_letters (              -- every message that was not stored as a result or a status
        id INTEGER PRIMARY KEY, topic TEXT, reason TEXT,
        payload BLOB,                 -- the bytes as received (the first KEEP_BYTES of a larger one)
        size INTEGER, sha256 TEXT,    -- of the whole payload
        received_at TEXT);
    fleet_conflicts (                 -- a result whose (board, id) is stored with other content
        id INTEGER PRIMARY KEY, board TEXT, result_id INTEGER, payload TEXT, sha256 TEXT, received_at TEXT,
        UNIQUE (board, result_id, sha256));
    fleet_bundle_state (              -- each board's bundles as its latest status reported them (rollouts)
        board TEXT PRIMARY KEY, current TEXT, candidate TEXT, phase TEXT, shadow_images INTEGER, agreement REAL,
        stage1_agreement REAL, error_rate REAL, last_change_at TEXT, last_change TEXT,
        payload TEXT,                 -- the whole status (JSON, as received)
        reported_at TEXT);
    fleet_schema (version INTEGER, migrated_at TEXT)   -- one row
    fleet_board_totals (board TEXT PRIMARY KEY, results INTEGER, last_recorded_at TEXT)
                                      -- per board: results stored and the latest recorded_at (schema v2), kept
                                      -- in the transaction that stores them; the read API's board list
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

from central.rows import (ADD_TOTALS, BACKFILL_TOTALS, CONFLICT, DUPLICATE, INDEXES, KEEP_BYTES,
                                       QUERY_TIMEOUT_S, RESULT_FIELDS, SCHEMA_VERSION, STORED, StorageError,
                                       board_totals, conflict_row, dead_letter_row, newer_schema, outcome,
                                       result_row, storable, utc_iso)
from edge_runtime.fleet.messages import BUNDLE_STATE_COLUMNS, Result
from edge_runtime.exits import utc_now

__all__ = ["Storage", "StorageError", "SQLiteStorage", "open_storage", "STORED", "DUPLICATE", "CONFLICT",
           "KEEP_BYTES", "QUERY_TIMEOUT_S"]

# Version 0: the tables as the first collector made them (a file it wrote opens as version 0).
TABLES = """
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
CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL, migrated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_board_totals (board TEXT PRIMARY KEY, results INTEGER NOT NULL, last_recorded_at TEXT);
"""
# Migration to each version from the one before (a fresh file goes through them all: cheap on empty tables).
MIGRATIONS = {
    1: [*INDEXES, "UPDATE fleet_results SET recorded_at = utc_iso(recorded_at) "
                  "WHERE recorded_at IS NOT utc_iso(recorded_at)"],
    2: [BACKFILL_TOTALS],
}


class Storage(Protocol):
    def add_result(self, result: Result) -> str:
        """Store a result once per (board, id): STORED; the same content again: DUPLICATE; other content under a
        stored key: recorded as a conflict (the stored result stays), CONFLICT."""

    def add_results(self, results: list[Result]) -> list[str]:
        """add_result for each, in one transaction, outcomes in order (a key twice in the batch: the first is
        STORED, the next DUPLICATE or CONFLICT); returns once committed. On StorageError nothing is stored."""

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

    def query(self, sql: str, params: Sequence = ()) -> list[dict]:
        """One read-only SELECT with `?` placeholders (on every back-end), its rows as dicts; stopped after
        QUERY_TIMEOUT_S."""

    def close(self) -> None:
        ...


class SQLiteStorage:
    """Storage in one SQLite file (WAL, each commit synced)."""

    def __init__(self, path: str | Path):
        self._lock = threading.RLock()
        with self._guard():
            # check_same_thread off: the lock serialises threads (the read API serves from several)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.create_function("utc_iso", 1, utc_iso, deterministic=True)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            with self._transaction():
                self._migrate()

    @contextlib.contextmanager
    def _guard(self):
        """One call at a time; sqlite3 and OS errors become StorageError (never worth retrying in-process)."""
        with self._lock:
            try:
                yield
            except (sqlite3.Error, OSError, OverflowError) as exc:
                raise StorageError(f"SQLite: {exc}", retry=False,
                                   refused=isinstance(exc, (sqlite3.DataError, OverflowError))) from exc

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        for statement in TABLES.split(";"):
            if statement.strip():
                self.db.execute(statement)
        row = self.db.execute("SELECT max(version) FROM fleet_schema").fetchone()
        version = row[0] or 0
        if version > SCHEMA_VERSION:
            raise newer_schema(version)
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[v]:
                self.db.execute(statement)
        if version != SCHEMA_VERSION:
            self.db.execute("DELETE FROM fleet_schema")
            self.db.execute("INSERT INTO fleet_schema VALUES (?, ?)", (SCHEMA_VERSION, utc_now()))

    def add_result(self, result: Result) -> str:
        return self.add_results([result])[0]

    def add_results(self, results: list[Result]) -> list[str]:
        now = utc_now()
        insert = (f"INSERT OR IGNORE INTO fleet_results ({', '.join(RESULT_FIELDS)}) "
                  f"VALUES ({', '.join('?' * len(RESULT_FIELDS))})")
        outcomes = []
        with self._guard(), self._transaction():
            for result in results:
                if self.db.execute(insert, result_row(result, now)).rowcount == 1:
                    outcomes.append(STORED)
                    continue
                (stored,) = self.db.execute("SELECT payload FROM fleet_results WHERE board = ? AND id = ?",
                                            (result.board, result.id)).fetchone()
                outcomes.append(outcome(stored, result))
                if outcomes[-1] == CONFLICT:
                    self.db.execute("INSERT OR IGNORE INTO fleet_conflicts (board, result_id, payload, sha256, "
                                    "received_at) VALUES (?, ?, ?, ?, ?)", conflict_row(result, now))
            self.db.executemany(ADD_TOTALS, board_totals(results, outcomes))
        return outcomes

    def add_dead_letter(self, topic: str, payload: bytes, reason: str) -> None:
        with self._guard():
            self.db.execute("INSERT INTO fleet_dead_letters (topic, reason, payload, size, sha256, received_at) "
                            "VALUES (?, ?, ?, ?, ?, ?)", dead_letter_row(topic, payload, reason, utc_now()))

    def set_status(self, board: str, status: str) -> None:
        with self._guard():
            self.db.execute("INSERT INTO fleet_boards VALUES (?, ?, ?) ON CONFLICT(board) DO UPDATE SET "
                            "status = excluded.status, changed_at = excluded.changed_at",
                            storable((board, status, utc_now())))

    def set_bundle_state(self, board: str, state: dict) -> None:
        cols = ("board", *BUNDLE_STATE_COLUMNS, "payload", "reported_at")
        values = {**state, "board": board, "reported_at": utc_now()}
        with self._guard():
            self.db.execute(f"INSERT OR REPLACE INTO fleet_bundle_state ({', '.join(cols)}) VALUES "
                            f"({', '.join('?' * len(cols))})", storable(values[c] for c in cols))

    def bundle_states(self) -> list[dict]:
        return self.query("SELECT * FROM fleet_bundle_state ORDER BY board")

    def counts(self) -> dict[str, int]:
        with self._guard():
            return {name: self.db.execute(f"SELECT count(*) FROM fleet_{name}").fetchone()[0]
                    for name in ("results", "boards", "dead_letters", "conflicts")}

    def query(self, sql: str, params: Sequence = ()) -> list[dict]:
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        with self._guard():
            # query_only: a statement that would write fails; the progress handler interrupts a long one
            self.db.execute("PRAGMA query_only = ON")
            self.db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                cur = self.db.execute(sql, tuple(params))
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row)) for row in cur]
            finally:
                self.db.set_progress_handler(None, 0)
                self.db.execute("PRAGMA query_only = OFF")

    def close(self) -> None:
        with self._guard():
            self.db.close()


def is_postgres_url(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def open_storage(db: str | Path) -> Storage:
    """The storage behind --db: a PostgreSQL URL (postgresql:// or postgres://) or a SQLite file path."""
    if isinstance(db, Path) and str(db).startswith(("postgresql:", "postgres:")):
        # Path("postgresql://h/db") is "postgresql:/h/db": the URL was lost on the way
        raise ValueError(f"{db} looks like a PostgreSQL URL made into a path: pass --db as text")
    if is_postgres_url(db):
        from central.postgres import PostgresStorage
        return PostgresStorage(db)
    return SQLiteStorage(db)
