"""The watch service's result store: one SQLite file (standard library, WAL journal).

Schema (PRAGMA user_version = 4; a version-1, -2 or -3 file is migrated in place on open, its rows kept):

    CREATE TABLE results (
        id            INTEGER PRIMARY KEY,   -- also written into each JSONL line as "id"
        key           TEXT NOT NULL UNIQUE,  -- identity of one dropped image: "<sha256>/<file name>"; a name
                                             --   that is not UTF-8 as "/" + hex of its bytes (edge_runtime/names.py)
                                             --   ("special:<size>:<mtime_ns>/<file name>": a FIFO, socket or device)
        name          TEXT NOT NULL,         -- file name as dropped (bytes that are not UTF-8 as \\xNN escapes)
        src_path      TEXT NOT NULL,         -- where it was found
        dest_path     TEXT NOT NULL,         -- where it goes: processed/, quarantine/ or src_path (leave in place)
        size          INTEGER NOT NULL,      -- bytes
        mtime_ns      INTEGER NOT NULL,
        sha256        TEXT,                  -- of the file content (NULL for a FIFO, socket or device)
        outcome       TEXT NOT NULL,         -- 'inspected' | 'quarantined'
        label         TEXT,                  -- final 8-class label (clean or the defect class); NULL if quarantined
        stage1_score  REAL,                  -- P(defective)
        defect_class  TEXT,                  -- NULL when clean or quarantined
        confidence    REAL,
        review        INTEGER,               -- 1 when Stage-2 confidence is under the review floor
        latency_ms    REAL,
        reason        TEXT,                  -- why it was quarantined
        variant       TEXT,                  -- model variant that produced the result
        state         TEXT NOT NULL,         -- 'recorded' (file not yet moved) | 'done' | 'missing' (the file
                                             --   is gone: not found at restart, or replaced after it was read)
        journaled     INTEGER NOT NULL,      -- 1 once the JSONL line is written (or no JSONL configured)
        recorded_at   TEXT NOT NULL,         -- ISO-8601 UTC
        done_at       TEXT,
        bundle_id     TEXT,                  -- the model: sha256 of the bundle's manifest.yaml (NULL: before v2)
        stage2_probs  TEXT,                  -- JSON {class: probability} of Stage 2; NULL when it did not run
                                             --   (or before v2: then only defect_class/confidence exist)
        published     INTEGER NOT NULL DEFAULT 0  -- v3: 1 once the MQTT broker acknowledged it
    );                                       --   (edge_runtime/fleet/publisher.py; rows older than v3: 1)
    CREATE TABLE bundles (                   -- each model bundle that produced results
        id                  TEXT PRIMARY KEY,    -- = results.bundle_id
        path                TEXT NOT NULL,       -- the folder it was loaded from when first seen
        taxonomy            TEXT NOT NULL,       -- JSON list of the classes, clean first
        stage2_classes      TEXT NOT NULL,       -- JSON list
        stage1_threshold    REAL NOT NULL,
        stage2_review_floor REAL NOT NULL,
        first_seen          TEXT NOT NULL
    );
    CREATE TABLE reviews (                   -- operator reviews; results are never edited
        id          INTEGER PRIMARY KEY,
        result_id   INTEGER NOT NULL REFERENCES results(id),
        supersedes  INTEGER NOT NULL DEFAULT 0,  -- the review of this result it replaces (0: the first one);
                                                 --   unique per result, so concurrent edits cannot fork
        old_label   TEXT NOT NULL,           -- the label in force before: the model's or the previous review's
        new_label   TEXT NOT NULL,           -- a taxonomy class, or 'unusable'
        reviewer    TEXT NOT NULL,
        reviewed_at TEXT NOT NULL,           -- ISO-8601 UTC
        UNIQUE (result_id, supersedes)
    );
    CREATE TABLE shadow_results (            -- v4: a candidate bundle's answers on live images (shadow runs,
        result_id    INTEGER NOT NULL REFERENCES results(id),   -- edge_runtime/service/shadow.py); never a result
        candidate_id TEXT NOT NULL,          -- the candidate's bundle id (in bundles)
        label        TEXT,                   -- the candidate's final label (NULL when it failed: see error)
        stage1_score REAL,
        defect_class TEXT,
        confidence   REAL,
        review       INTEGER,
        stage2_probs TEXT,
        latency_ms   REAL,
        error        TEXT,                   -- why the candidate could not inspect an image the current one did
        agree        INTEGER NOT NULL,       -- 1: the same final label as the recorded result
        stage1_agree INTEGER NOT NULL,       -- 1: the same Stage-1 decision (defective or not)
        recorded_at  TEXT NOT NULL,
        PRIMARY KEY (result_id, candidate_id)
    );
    CREATE INDEX results_state ON results(state) WHERE state != 'done';
    CREATE INDEX results_journal ON results(journaled) WHERE journaled = 0;
    CREATE INDEX results_publish ON results(id) WHERE published = 0;
    CREATE INDEX results_dest ON results(dest_path);
    CREATE INDEX results_src ON results(src_path, size, mtime_ns);
    CREATE INDEX reviews_result ON reviews(result_id, id);
    CREATE INDEX shadow_candidate ON shadow_results(candidate_id);

Query it with the sqlite3 shell, e.g. `SELECT label, count(*) FROM results GROUP BY label`.

Storage errors (disk full, read-only, I/O error) are raised as StorageError so the service can stop taking
work instead of losing results.
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path

from edge_runtime.exits import StorageError, utc_now  # noqa: F401  (re-exported: the store raises and stamps with them)
from edge_runtime.names import db_text  # noqa: F401  (re-exported: paths as database text)

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    src_path TEXT NOT NULL,
    dest_path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('inspected', 'quarantined')),
    label TEXT,
    stage1_score REAL,
    defect_class TEXT,
    confidence REAL,
    review INTEGER,
    latency_ms REAL,
    reason TEXT,
    variant TEXT,
    state TEXT NOT NULL CHECK (state IN ('recorded', 'done', 'missing')),
    journaled INTEGER NOT NULL DEFAULT 0,
    recorded_at TEXT NOT NULL,
    done_at TEXT,
    bundle_id TEXT,
    stage2_probs TEXT,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS results_state ON results(state) WHERE state != 'done';
CREATE INDEX IF NOT EXISTS results_journal ON results(journaled) WHERE journaled = 0;
CREATE INDEX IF NOT EXISTS results_publish ON results(id) WHERE published = 0;
CREATE INDEX IF NOT EXISTS results_dest ON results(dest_path);
CREATE INDEX IF NOT EXISTS results_src ON results(src_path, size, mtime_ns);
CREATE TABLE IF NOT EXISTS bundles (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    taxonomy TEXT NOT NULL,
    stage2_classes TEXT NOT NULL,
    stage1_threshold REAL NOT NULL,
    stage2_review_floor REAL NOT NULL,
    first_seen TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    result_id INTEGER NOT NULL REFERENCES results(id),
    supersedes INTEGER NOT NULL DEFAULT 0,
    old_label TEXT NOT NULL,
    new_label TEXT NOT NULL,
    reviewer TEXT NOT NULL CHECK (length(reviewer) > 0),
    reviewed_at TEXT NOT NULL,
    UNIQUE (result_id, supersedes)
);
CREATE INDEX IF NOT EXISTS reviews_result ON reviews(result_id, id);
CREATE TABLE IF NOT EXISTS shadow_results (
    result_id INTEGER NOT NULL REFERENCES results(id),
    candidate_id TEXT NOT NULL,
    label TEXT,
    stage1_score REAL,
    defect_class TEXT,
    confidence REAL,
    review INTEGER,
    stage2_probs TEXT,
    latency_ms REAL,
    error TEXT,
    agree INTEGER NOT NULL,
    stage1_agree INTEGER NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (result_id, candidate_id)
);
CREATE INDEX IF NOT EXISTS shadow_candidate ON shadow_results(candidate_id)
"""
SHADOW_COLUMNS = ("result_id", "candidate_id", "label", "stage1_score", "defect_class", "confidence", "review",
                  "stage2_probs", "latency_ms", "error", "agree", "stage1_agree", "recorded_at")
COLUMNS = ("id", "key", "name", "src_path", "dest_path", "size", "mtime_ns", "sha256", "outcome", "label",
           "stage1_score", "defect_class", "confidence", "review", "latency_ms", "reason", "variant", "state",
           "journaled", "recorded_at", "done_at", "bundle_id", "stage2_probs", "published")
# Version 1 -> 2: results gain these columns (appended, so a migrated table matches a new one); the bundles and
# reviews tables are created.
V2_RESULT_COLUMNS = (("bundle_id", "TEXT"), ("stage2_probs", "TEXT"))
# Version 3 -> 4: the shadow_results table is created (nothing else changes).
# Version 2 -> 3: results gain `published` (MQTT). Rows recorded before it are marked published: a board that
# turns MQTT on publishes what it records from then on, not its whole history.
V3_RESULT_COLUMN = "published INTEGER NOT NULL DEFAULT 0"


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and ("full" in str(exc).lower())


class Store:
    def __init__(self, path: str | os.PathLike, durable: bool = True):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below. One user at a
            # time, but the service may be built in one thread and run in another.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(f"{self.path}: cannot use WAL journal (got {mode}); is it on a network share?")
            # FULL: a committed result survives power loss; NORMAL: survives process kills only.
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            # A small, fixed page cache: inserts and indexed look-ups need little, and the service's memory
            # must not grow with the size of the database.
            self.db.execute("PRAGMA cache_size=-512")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, 3, SCHEMA_VERSION):
                raise StorageError(f"{self.path}: result database schema version {version} is not supported "
                                   f"(this version writes {SCHEMA_VERSION})")
            if version != SCHEMA_VERSION:
                self._create_or_migrate()
            st = os.stat(self.path)
            self.identity = (st.st_dev, st.st_ino)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open result database: {exc}", is_disk_full(exc)) from exc
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot create result database: {exc.strerror or exc}",
                               is_disk_full(exc)) from exc

    def _create_or_migrate(self) -> None:
        """Create the schema, or bring a version-1, -2 or -3 file to this version, in one transaction: a service and
        a review server opening the same old file at once migrate it once."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]     # again, under the write lock
            if version == 1:
                have = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
                for column, kind in V2_RESULT_COLUMNS:
                    if column not in have:
                        self.db.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
            if version in (1, 2):
                self.db.execute(f"ALTER TABLE results ADD COLUMN {V3_RESULT_COLUMN}")
                self.db.execute("UPDATE results SET published = 1")
            if version != SCHEMA_VERSION:
                for statement in SCHEMA.split(";"):      # executescript would commit half-way
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close; an uncommitted group transaction is rolled back (those images were not moved)."""
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.db.close()
        except sqlite3.Error:
            pass

    def still_at_path(self) -> bool:
        """Whether the file this connection writes is still the one at its path (not deleted or replaced, e.g.
        by a watch folder deleted and re-created around it): results committed to a deleted file are lost."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    # -- reads -------------------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT * FROM results WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def dest_taken(self, dest: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE dest_path = ? LIMIT 1", (dest,)).fetchone() is not None

    def seen_in_place(self, src: str, size: int, mtime_ns: int) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE src_path = ? AND size = ? AND mtime_ns = ? LIMIT 1",
                               (src, size, mtime_ns)).fetchone() is not None

    def unfinished(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM results WHERE state = 'recorded' ORDER BY id")]

    def unjournaled(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM results WHERE journaled = 0 ORDER BY id")]

    def unpublished(self, after_id: int, limit: int) -> list[dict]:
        """Committed rows not yet acknowledged by the MQTT broker, id > after_id, oldest first."""
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM results WHERE published = 0 AND id > ? ORDER BY id LIMIT ?", (after_id, limit))]

    def count_unpublished(self) -> int:
        return self.db.execute("SELECT count(*) FROM results WHERE published = 0").fetchone()[0]

    def since(self, after_id: int, limit: int) -> list[dict]:
        """Rows with id > after_id, oldest first (the HTTP API's /results)."""
        return [dict(r) for r in self.db.execute(
            "SELECT * FROM results WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))]

    def mark_published(self, ids) -> None:
        if ids:
            self._write(lambda: self.db.executemany("UPDATE results SET published = 1 WHERE id = ?",
                                                    [(i,) for i in ids]))

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM results").fetchone()[0]

    # -- writes ------------------------------------------------------------------------------------------
    def _fail(self, exc: sqlite3.Error, what: str = "write") -> StorageError:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        return StorageError(f"{self.path}: cannot {what} result database: {exc}", is_disk_full(exc))

    def _write(self, fn):
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            return out
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def transaction(self, fn):
        """fn() inside BEGIN IMMEDIATE ... COMMIT (rolled back if it raises); sqlite errors as StorageError."""
        return self._write(fn)

    def register_bundle(self, bundle) -> None:
        """Record the model bundle (an edge_runtime.bundle.Bundle) whose id the next results carry."""
        self._write(lambda: self.db.execute(
            "INSERT OR IGNORE INTO bundles (id, path, taxonomy, stage2_classes, stage1_threshold, "
            "stage2_review_floor, first_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (bundle.bundle_id, db_text(bundle.root), json.dumps(list(bundle.taxonomy)),
             json.dumps(list(bundle.stage2_classes)), bundle.stage1_threshold, bundle.stage2_review_floor,
             utc_now())))

    def insert_shadow(self, row: dict) -> None:
        """A candidate's answer for a result, into the open group transaction (with the result it shadows)."""
        try:
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            cols = [c for c in SHADOW_COLUMNS if c in row]
            self.db.execute(f"INSERT OR REPLACE INTO shadow_results ({', '.join(cols)}) VALUES "
                            f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def shadow_summary(self, candidate_id: str, since: str | None = None) -> dict:
        """How a candidate compares with the results it shadowed (those recorded at or after `since`, ISO time):
        images, label and Stage-1 agreement, failures, mean latency, agreement per recorded label, and on the
        images operators reviewed since (their latest review, 'unusable' left out) which of the two was right."""
        where, args = "s.candidate_id = ?", [candidate_id]
        if since:
            where, args = where + " AND s.recorded_at >= ?", args + [since]
        n, agree, stage1, errors, latency = self.db.execute(
            f"SELECT count(*), coalesce(sum(s.agree), 0), coalesce(sum(s.stage1_agree), 0), "
            f"coalesce(sum(s.error IS NOT NULL), 0), avg(s.latency_ms) FROM shadow_results s WHERE {where}",
            args).fetchone()
        per_class = {label: {"images": c, "agree": a} for label, c, a in self.db.execute(
            f"SELECT r.label, count(*), sum(s.agree) FROM shadow_results s JOIN results r ON r.id = s.result_id "
            f"WHERE {where} GROUP BY r.label ORDER BY r.label", args)}
        reviewed = self.db.execute(
            f"SELECT count(*), coalesce(sum(r.label = v.new_label), 0), coalesce(sum(s.label = v.new_label), 0) "
            f"FROM shadow_results s JOIN results r ON r.id = s.result_id "
            f"JOIN reviews v ON v.id = (SELECT max(id) FROM reviews WHERE result_id = s.result_id) "
            f"WHERE {where} AND v.new_label != 'unusable'", args).fetchone()
        return {"candidate": candidate_id, "images": n, "agreement": agree / n if n else None,
                "stage1_agreement": stage1 / n if n else None, "errors": errors,
                "error_rate": errors / n if n else None,
                "latency_ms": None if latency is None else round(latency, 3),
                "per_class": {k: {**v, "agreement": v["agree"] / v["images"]} for k, v in per_class.items()},
                "reviewed": {"images": reviewed[0], "current_right": reviewed[1], "candidate_right": reviewed[2]}}

    def shadows_of(self, result_ids) -> dict[int, list[dict]]:
        """The candidates' answers for these results, by result id."""
        ids = list(result_ids)
        out: dict[int, list[dict]] = {}
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            for r in self.db.execute(f"SELECT * FROM shadow_results WHERE result_id IN ({', '.join('?' * len(chunk))}) "
                                     "ORDER BY recorded_at", chunk):
                out.setdefault(r["result_id"], []).append(dict(r))
        return out

    def latest_bundle_path(self) -> str | None:
        """Where the bundle that recorded the latest result was loaded from (None when none is recorded)."""
        row = self.db.execute("SELECT b.path FROM results r JOIN bundles b ON b.id = r.bundle_id "
                              "ORDER BY r.id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def insert(self, row: dict) -> int:
        """Insert one result into the open group transaction (started here if needed); not durable until
        commit(). Readers on this connection (get, dest_taken) already see it."""
        try:
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            cols = [c for c in COLUMNS if c != "id" and c in row]
            cur = self.db.execute(f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                  [row[c] for c in cols])
            return cur.lastrowid
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def commit(self, done_ids=(), journaled_ids=(), missing_ids=()) -> None:
        """Apply the deferred state updates and commit: durable when this returns."""
        try:
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            self._apply(done_ids, journaled_ids, missing_ids)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail(exc) from exc

    def record(self, row: dict, done_ids=(), journaled_ids=()) -> int:
        """Insert one result and commit."""
        row_id = self.insert(row)
        self.commit(done_ids, journaled_ids)
        return row_id

    def update(self, done_ids=(), journaled_ids=(), missing_ids=()) -> None:
        if not (done_ids or journaled_ids or missing_ids):
            return

        self._write(lambda: self._apply(done_ids, journaled_ids, missing_ids))

    def _apply(self, done_ids, journaled_ids, missing_ids=()) -> None:
        now = utc_now()
        if missing_ids:
            self.db.executemany("UPDATE results SET state = 'missing', done_at = ? WHERE id = ?",
                                [(now, i) for i in missing_ids])
        if done_ids:
            self.db.executemany("UPDATE results SET state = 'done', done_at = ? WHERE id = ? AND state != 'done'",
                                [(now, i) for i in done_ids])
        if journaled_ids:
            self.db.executemany("UPDATE results SET journaled = 1 WHERE id = ?", [(i,) for i in journaled_ids])
