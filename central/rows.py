"""What the collector's back-ends store, decided once for all of them (storage.py: SQLite, postgres.py: PostgreSQL):
the row of a result, of a dead letter and of a conflict, the duplicate-or-conflict rule, the schema version and
the indexes, and the error every back-end raises when storing fails for a reason that is not the message's.

recorded_at is kept in its column as UTC, `YYYY-MM-DDTHH:MM:SS.fff+00:00` (a time without a zone is taken as
UTC), so that `substr(recorded_at, 1, 10)` is the UTC day and text order is time order on every back-end; the
payload keeps the time as the board sent it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json

from edge_runtime.fleet.messages import COLUMNS, Result
from edge_runtime import exits

KEEP_BYTES = 64 * 1024          # of a dead letter's payload; its size and sha256 are of the whole
STORED, DUPLICATE, CONFLICT = "stored", "duplicate", "conflict"
QUERY_TIMEOUT_S = 30.0          # a read-only query() running longer is stopped (the read API answers meanwhile)
RESULT_FIELDS = ("board", "id", *COLUMNS, "payload", "received_at")

# Version 1 (issue 21): the indexes below and recorded_at in UTC. Version 0: the tables without fleet_schema.
# Version 2: fleet_board_totals, each board's result count and latest recorded_at, kept in the transaction that
# stores the results (the fleet's board list must not count a table that grows by millions of rows a day).
SCHEMA_VERSION = 2
# The queries people run: one board's results over time, counts per label per day (a time range, grouped by
# label: the label rides along in the index), one bundle's results.
INDEXES = (
    "CREATE INDEX IF NOT EXISTS fleet_results_board_time ON fleet_results (board, recorded_at)",
    "CREATE INDEX IF NOT EXISTS fleet_results_time_label ON fleet_results (recorded_at, label)",
    "CREATE INDEX IF NOT EXISTS fleet_results_bundle_time ON fleet_results (bundle_id, recorded_at)",
)


# Version 2's migration, the same on both back-ends: the totals of what is stored already.
BACKFILL_TOTALS = ("INSERT INTO fleet_board_totals (board, results, last_recorded_at) "
                   "SELECT board, count(*), max(recorded_at) FROM fleet_results GROUP BY board")
# Adding a batch's new results to the totals (? placeholders; the PostgreSQL back-end translates them), one row
# per board, in board order (two collectors lock the same rows in the same order: no deadlock).
ADD_TOTALS = ("INSERT INTO fleet_board_totals AS t (board, results, last_recorded_at) VALUES (?, ?, ?) "
              "ON CONFLICT (board) DO UPDATE SET results = t.results + excluded.results, last_recorded_at = "
              "CASE WHEN t.last_recorded_at IS NULL OR excluded.last_recorded_at > t.last_recorded_at "
              "THEN excluded.last_recorded_at ELSE t.last_recorded_at END")


class StorageError(exits.StorageError):
    """Storing failed: the board store's StorageError (an HTTP server answers it with 503), plus retry: True when
    waiting and trying again may succeed (a PostgreSQL connection lost), and refused: True when the database
    refused a value of this write (a data error), so the message it came from is to blame, not the storage."""

    def __init__(self, message: str, retry: bool = False, disk_full: bool = False, refused: bool = False):
        super().__init__(message, disk_full)
        self.retry = retry
        self.refused = refused


def text(value: str) -> str:
    """Text any database takes (lone surrogates and NUL cannot be stored as they are: escaped)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\x00")


def storable(values) -> tuple:
    """The one rule for what is written to a database: every text value of a statement through text(), the
    others as they are. Both back-ends pass every write's parameters through it."""
    return tuple(text(v) if isinstance(v, str) else v for v in values)


def utc_iso(value):
    """An ISO-8601 time as UTC with milliseconds (no zone: taken as UTC); anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    try:
        return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")
    except OverflowError:           # year 1 or 9999 shifted out of range: kept as sent
        return value


def result_row(result: Result, received_at: str) -> tuple:
    """The values of RESULT_FIELDS for one result."""
    columns = {**result.columns, "recorded_at": utc_iso(result.columns["recorded_at"])}
    return storable((result.board, result.id, *[columns[c] for c in COLUMNS], result.payload, received_at))


def board_totals(results: list[Result], outcomes: list[str]) -> list[tuple]:
    """(board, new results, latest recorded_at) for each board with a result STORED in this batch, by board."""
    totals: dict[str, list] = {}
    for r, o in zip(results, outcomes):
        if o == STORED:
            at = utc_iso(r.columns["recorded_at"])
            t = totals.setdefault(r.board, [0, at])
            t[0] += 1
            t[1] = max(t[1], at)
    return [(board, n, at) for board, (n, at) in sorted(totals.items())]


def outcome(stored_payload: str, result: Result) -> str:
    """A result whose (board, id) is already stored: DUPLICATE when the stored message is the same JSON (key
    order and spacing aside), else CONFLICT (the stored row stays; the newcomer goes to fleet_conflicts)."""
    return DUPLICATE if json.loads(stored_payload) == result.message else CONFLICT


def conflict_row(result: Result, received_at: str) -> tuple:
    """(board, result_id, payload, sha256, received_at) of fleet_conflicts."""
    return storable((result.board, result.id, result.payload,
                     hashlib.sha256(result.payload.encode("utf-8")).hexdigest(), received_at))


def dead_letter_row(topic: str, payload: bytes, reason: str, received_at: str) -> tuple:
    """(topic, reason, payload, size, sha256, received_at) of fleet_dead_letters: the first KEEP_BYTES of the
    payload, its size and digest of the whole."""
    return storable((topic, reason, bytes(payload[:KEEP_BYTES]), len(payload), hashlib.sha256(payload).hexdigest(),
                     received_at))


def newer_schema(found: int) -> StorageError:
    return StorageError(f"the database's schema version {found} is newer than this collector's ({SCHEMA_VERSION}): "
                        "upgrade the collector")
