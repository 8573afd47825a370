"""What the central read API (central/api.py) asks of the collector's database, read-only.

open_reader(db) opens the database for reading only, on either back-end, and never creates, migrates or writes it:
    SQLite       the file opened with `mode=ro` and `PRAGMA query_only`; a missing file is an error
    PostgreSQL   sessions with default_transaction_read_only=on (every statement runs in a read-only
                 transaction: the server refuses any write) and a statement_timeout
Each thread gets a connection of its own (the API answers on a few worker threads). A PostgreSQL connection found
lost (a server restart) is replaced and the read run once more; a database that does not answer raises
StorageError (the API: 503) and the next query connects again. A query taking over QUERY_TIMEOUT_S is cancelled
(StorageError: narrow the filters).

The questions (every value from the request goes into SQL only as a bound parameter; the SQL text is built only
from the fixed names below):
    boards(reader)                    every board seen (status, results or bundle report): status, changed_at,
                                      its bundle state (fleet_bundle_state), result count, last recorded_at
    counts(reader, by, filters)       result counts grouped by any of BY_KEYS (day: the UTC day of recorded_at)
    results(reader, filters, cursor, limit)
                                      results newest first (recorded_at, then board, then id, all descending),
                                      a page at a time: `next` is an opaque cursor to pass back as `before`
Filters (parse_filters): board, label, outcome, bundle_id, review (true/false), since (recorded_at >= it),
until (recorded_at < it). Times are ISO-8601; one without an offset is UTC; they are compared as UTC text in the
stored form (storage.py keeps recorded_at as `YYYY-MM-DDTHH:MM:SS.fff+00:00`).
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence
from urllib.parse import quote

from central.postgres import CONNECT_TIMEOUT_S, INSTALL_HINT, placeholders
from central.rows import QUERY_TIMEOUT_S, utc_iso
from edge_runtime.fleet.messages import BUNDLE_STATE_COLUMNS
from central.storage import StorageError, is_postgres_url
from edge_runtime.netnames import BOARD_RULE, is_board_name
from edge_runtime.fleet import json_input

MAX_LIMIT, DEFAULT_LIMIT = 1000, 100
MAX_GROUPS = 10_000                 # /counts rows at most; more: truncated (narrow the filters)
BY_KEYS = {"board": "board", "label": "label", "day": "substr(recorded_at, 1, 10)", "bundle_id": "bundle_id",
           "outcome": "outcome"}
FILTERS = ("board", "label", "outcome", "bundle_id", "review", "since", "until")
RESULT_COLUMNS = ("board", "id", "name", "label", "outcome", "stage1_score", "defect_class", "confidence", "review",
                  "sha256", "bundle_id", "recorded_at", "received_at")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_LABEL = 100


class BadParameter(ValueError):
    """A request parameter that cannot be used; the message names it."""


class Reader(Protocol):
    def query(self, sql: str, params: Sequence = ()) -> list[dict]:
        """Rows of one read-only SELECT (`?` placeholders) as dicts."""


# ---------------------------------------------------------------------------------------------------------
# read-only connections
# ---------------------------------------------------------------------------------------------------------
class _PerThread:
    """One connection per thread, made on first use and again after a failure."""

    def __init__(self, connect):
        self._connect, self._local, self._all, self._lock = connect, threading.local(), [], threading.Lock()

    def get(self):
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
            with self._lock:
                self._all.append(con)
        return con

    def drop(self) -> None:
        con, self._local.con = getattr(self._local, "con", None), None
        if con is not None:
            with self._lock:
                self._all.remove(con)
            try:
                con.close()
            except Exception:           # already broken: nothing more to release
                pass

    def close(self) -> None:
        with self._lock:
            cons, self._all = self._all, []
        for con in cons:
            try:
                con.close()
            except Exception:
                pass


class SQLiteReader:
    """A collector's SQLite file, read-only (mode=ro: SQLite itself refuses writes; query_only on top)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StorageError(f"{self.path}: no such database file (the collector creates it)", retry=False)
        self._cons = _PerThread(self._connect)
        self.query("SELECT 1")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True, timeout=QUERY_TIMEOUT_S,
                              check_same_thread=False)
        con.execute("PRAGMA query_only = ON")
        return con

    def query(self, sql: str, params: Sequence = ()) -> list[dict]:
        try:
            con = self._cons.get()
            deadline = time.monotonic() + QUERY_TIMEOUT_S
            # called every 10,000 SQLite steps; nonzero interrupts the query
            con.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            cur = con.execute(sql, tuple(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        except sqlite3.OperationalError as exc:
            self._cons.drop()
            if "interrupted" in str(exc):
                raise StorageError(f"query over {QUERY_TIMEOUT_S} s: narrow the filters", retry=False) from None
            raise StorageError(f"{self.path}: {exc}", retry=True) from None
        except sqlite3.Error as exc:
            self._cons.drop()
            raise StorageError(f"{self.path}: {exc}", retry=False) from None

    def close(self) -> None:
        self._cons.close()


class PostgresReader:
    """A collector's PostgreSQL database, read-only: every session has default_transaction_read_only=on (the
    server refuses writes) and a statement_timeout of QUERY_TIMEOUT_S."""

    def __init__(self, url: str):
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise StorageError(f"a postgresql:// database needs psycopg 3: {INSTALL_HINT}") from None
        self._psycopg, self._dict_row = psycopg, dict_row
        try:
            self._params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {_first_line(exc)}") from None
        # appended last: these settings win over any the URL carries
        self._params["options"] = (f"{self._params.get('options', '')} -c default_transaction_read_only=on "
                                   f"-c statement_timeout={int(QUERY_TIMEOUT_S * 1000)}").strip()
        self._params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
        self._params.setdefault("application_name", "sem-inspect-central-api")
        self._cons = _PerThread(self._connect)
        self.query("SELECT 1")

    def _connect(self):
        try:
            return self._psycopg.connect(**self._params, autocommit=True, row_factory=self._dict_row)
        except self._psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {_first_line(exc)}", retry=True) from None

    def query(self, sql: str, params: Sequence = ()) -> list[dict]:
        for attempt in (1, 2):
            con = self._cons.get()
            try:
                return con.execute(placeholders(sql), tuple(params)).fetchall()
            except self._psycopg.errors.QueryCanceled:
                raise StorageError(f"query over {QUERY_TIMEOUT_S} s: narrow the filters", retry=False) from None
            except self._psycopg.Error as exc:
                lost = con.closed or con.broken
                if lost:
                    self._cons.drop()
                # a connection lost since its last use (a server restart): a read is safe to run again once
                if not (lost and attempt == 1):
                    raise StorageError(f"PostgreSQL: {_first_line(exc)}", retry=True) from None

    def close(self) -> None:
        self._cons.close()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_reader(db: str | Path) -> SQLiteReader | PostgresReader:
    """The collector's database behind --db, read-only; StorageError when it cannot be opened or is not one."""
    reader = PostgresReader(str(db)) if is_postgres_url(str(db)) else SQLiteReader(db)
    try:
        tables = {r["name"] for r in reader.query(_TABLES_SQL[isinstance(reader, PostgresReader)])}
    except StorageError:
        reader.close()
        raise
    missing = sorted({"fleet_results", "fleet_boards", "fleet_bundle_state"} - tables)
    if missing:
        reader.close()
        raise StorageError(f"not a collector database (no table {', '.join(missing)}): start the collector on it "
                           f"first", retry=False)
    return reader


_TABLES_SQL = {False: "SELECT name FROM sqlite_master WHERE type = 'table'",
               True: "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()"}


# ---------------------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    board: str | None = None
    label: str | None = None
    outcome: str | None = None
    bundle_id: str | None = None
    review: int | None = None
    since: str | None = None        # UTC text, inclusive
    until: str | None = None        # UTC text, exclusive


def utc_text(name: str, value: str) -> str:
    """An ISO-8601 time from a request -> the stored UTC form (no offset: UTC); BadParameter naming `name`."""
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise BadParameter(f"{name} must be an ISO-8601 time (e.g. 2026-12-02 or 2026-12-02T10:00:00Z; "
                           f"write + as %2B), got {_short(value)}") from None
    return utc_iso(value)       # the storage's rule: the form recorded_at is stored in


def parse_filters(query: dict[str, str]) -> Filters:
    """The filter parameters of a request (one value each) -> Filters; BadParameter naming a bad one."""
    f: dict = {}
    if "board" in query:
        if not is_board_name(query["board"]):
            raise BadParameter(f"board must be a board name ({BOARD_RULE}), got {_short(query['board'])}")
        f["board"] = query["board"]
    if "label" in query:
        if not 0 < len(query["label"]) <= MAX_LABEL or any(ord(c) < 32 or ord(c) == 127 for c in query["label"]):
            raise BadParameter(f"label must be text of 1..{MAX_LABEL} characters without control characters "
                               "(a NUL cannot be stored, so no stored label holds one)")
        f["label"] = query["label"]     # any text: a label no board sent simply matches nothing
    if "outcome" in query:
        if query["outcome"] not in ("inspected", "quarantined"):
            raise BadParameter(f"outcome must be inspected or quarantined, got {_short(query['outcome'])}")
        f["outcome"] = query["outcome"]
    if "bundle_id" in query:
        if not _HEX64.fullmatch(query["bundle_id"]):
            raise BadParameter(f"bundle_id must be 64 lowercase hex digits, got {_short(query['bundle_id'])}")
        f["bundle_id"] = query["bundle_id"]
    if "review" in query:
        flag = {"true": 1, "1": 1, "false": 0, "0": 0}.get(query["review"].lower())
        if flag is None:
            raise BadParameter(f"review must be true or false, got {_short(query['review'])}")
        f["review"] = flag
    for name in ("since", "until"):
        if name in query:
            f[name] = utc_text(name, query[name])
    return Filters(**f)


def parse_by(value: str | None) -> tuple[str, ...]:
    """/counts?by=: comma-separated names from BY_KEYS, each at most once (none: one total)."""
    if value is None:
        return ()
    names = tuple(v.strip() for v in value.split(","))
    bad = [n for n in names if n not in BY_KEYS]
    if bad or len(set(names)) != len(names):
        raise BadParameter(f"by must be distinct names from {', '.join(BY_KEYS)}, comma-separated, got "
                           f"{_short(value)}")
    return names


def parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,7}", value) or not 1 <= int(value) <= MAX_LIMIT:
        raise BadParameter(f"limit must be an integer in 1..{MAX_LIMIT}, got {_short(value)}")
    return int(value)


def encode_cursor(row: dict) -> str:
    raw = json.dumps([row["recorded_at"], row["board"], row["id"]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_cursor(value: str | None) -> tuple[str, str, int] | None:
    """/results?before=: a `next` from an earlier page -> (recorded_at, board, id); BadParameter if it is not one."""
    if value is None:
        return None
    bad = BadParameter("before must be the `next` value of an earlier page")
    if len(value) > 400 or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise bad
    try:
        doc = json_input.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, json_input.UntrustedJSON):
        raise bad from None
    if not (isinstance(doc, list) and len(doc) == 3 and isinstance(doc[0], str) and is_board_name(doc[1])
            and isinstance(doc[2], int) and not isinstance(doc[2], bool)):
        raise bad
    try:
        if utc_text("before", doc[0]) != doc[0]:
            raise bad
    except BadParameter:
        raise bad from None
    return doc[0], doc[1], doc[2]


def _short(value) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------
# the queries
# ---------------------------------------------------------------------------------------------------------
def _where(f: Filters, extra: tuple[str, ...] = (), extra_params: tuple = ()) -> tuple[str, list]:
    conds, params = [], []
    for col in ("board", "label", "outcome", "bundle_id", "review"):
        value = getattr(f, col)
        if value is not None:
            conds.append(f"{col} = ?")
            params.append(value)
    if f.since is not None:
        conds.append("recorded_at >= ?")
        params.append(f.since)
    if f.until is not None:
        conds.append("recorded_at < ?")
        params.append(f.until)
    conds += extra
    params += extra_params
    return (" WHERE " + " AND ".join(conds)) if conds else "", params


_BOARDS_SQL = f"""
WITH r AS (SELECT board, results, last_recorded_at FROM fleet_board_totals),
     names AS (SELECT board FROM fleet_boards UNION SELECT board FROM fleet_bundle_state UNION SELECT board FROM r)
SELECT n.board, b.status, b.changed_at, coalesce(r.results, 0) AS results, r.last_recorded_at,
       {', '.join(f's.{c}' for c in BUNDLE_STATE_COLUMNS)}, s.reported_at
FROM names n LEFT JOIN fleet_boards b ON b.board = n.board LEFT JOIN fleet_bundle_state s ON s.board = n.board
     LEFT JOIN r ON r.board = n.board
ORDER BY n.board"""


def boards(reader: Reader) -> list[dict]:
    """Every board the collector has heard of, by name; "bundle" is null until it reported its bundles."""
    out = []
    for row in reader.query(_BOARDS_SQL):
        bundle = {c: row[c] for c in (*BUNDLE_STATE_COLUMNS, "reported_at")}
        out.append({"board": row["board"], "status": row["status"], "changed_at": row["changed_at"],
                    "results": int(row["results"]), "last_recorded_at": row["last_recorded_at"],
                    "bundle": bundle if bundle["current"] is not None else None})
    return out


def counts(reader: Reader, by: tuple[str, ...], f: Filters) -> dict:
    """Result counts per group of `by` (BY_KEYS names), ordered by the groups; at most MAX_GROUPS rows."""
    where, params = _where(f)
    keys = [f"{BY_KEYS[name]} AS {name}" for name in by]
    positions = ", ".join(str(i + 1) for i in range(len(by)))
    sql = f"SELECT {', '.join([*keys, 'count(*) AS results'])} FROM fleet_results{where}"
    if by:
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    rows = reader.query(sql + " LIMIT ?", [*params, MAX_GROUPS + 1])
    for row in rows:
        row["results"] = int(row["results"])
    return {"by": list(by), "counts": rows[:MAX_GROUPS], "truncated": len(rows) > MAX_GROUPS}


def results(reader: Reader, f: Filters, before: tuple[str, str, int] | None, limit: int) -> dict:
    """One page of results, newest first; "next" continues after its last row (null: no more)."""
    extra = ("(recorded_at, board, id) < (?, ?, ?)",) if before else ()
    where, params = _where(f, extra, tuple(before or ()))
    rows = reader.query(f"SELECT {', '.join(RESULT_COLUMNS)} FROM fleet_results{where} "
                        f"ORDER BY recorded_at DESC, board DESC, id DESC LIMIT ?", [*params, limit + 1])
    page = rows[:limit]
    for row in page:
        row["id"] = int(row["id"])
        row["review"] = None if row["review"] is None else bool(row["review"])
    return {"results": page, "next": encode_cursor(page[-1]) if len(rows) > limit else None}


def health(reader: Reader) -> dict:
    """The database answers; its schema version (fleet_schema; 0: a database from before it)."""
    tables = {r["name"] for r in reader.query(_TABLES_SQL[isinstance(reader, PostgresReader)])}
    version = reader.query("SELECT max(version) AS v FROM fleet_schema")[0]["v"] if "fleet_schema" in tables else 0
    return {"database": True, "schema_version": version}
