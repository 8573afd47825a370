"""Operator reviews of recorded results: the review queue, corrections, the summary, what export takes.

Used by the review page (edge_runtime/review/server.py) and `edge-inspect export-labels`. Reviews go into the
store's `reviews` table (schema in edge_runtime/db/store.py); results are never edited.

The queue: inspected results, Stage-2 `review`-flagged ones first (least confident first), then the rest by
Stage-1 margin |P(defective) - threshold| (threshold of the bundle that produced the result; results recorded
before bundle provenance have no known margin and come last), then by id.

A result's label: the new label of its latest review, else the model's. Its review state: `unreviewed`,
`confirmed` (latest review keeps the model's label), `corrected` (another class) or `unusable`.

Reviews that disagree: results with the same recorded content (sha256) whose latest reviews give different
classes are a conflict (edge_runtime/review/conflicts.py): listed by `conflicts()`, left out of export and
adaptation, until one of them is reviewed again so the labels agree.

Concurrent edits (optimistic): a review names the review it replaces, `expected_review_id` (0: the result had
none when the operator looked). If another review landed meanwhile, the request is refused (Conflict, HTTP 409)
with the review now in force; nothing is overwritten silently. The database enforces the same rule
(UNIQUE(result_id, supersedes)), so even two servers on one file cannot fork a result's review history.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import BinaryIO

from edge_runtime import strict
from edge_runtime.classnames import ClassNameError, check_class_name
from edge_runtime.db.store import Store, utc_now
from edge_runtime.review.conflicts import Conflicts, split_conflicts
from edge_runtime.safeopen import NotBeneath, NotRegularFile, open_beneath

UNUSABLE = "unusable"
REVIEW_ID = strict.Number(0, 2**63 - 1, integer=True)      # a review's id (0: the result had none)
STATES = ("unreviewed", "reviewed", "confirmed", "corrected", "unusable", "all")
MAX_REVIEWER = 64
MAX_PAGE = 500


class ReviewError(ValueError):
    """A request that cannot be honoured; `status` is the HTTP status it maps to."""
    status = 400


class NotFound(ReviewError):
    status = 404


class Forbidden(ReviewError):
    status = 403


class Conflict(ReviewError):
    """Another review of the result landed since the operator looked; `current` is the one now in force."""
    status = 409

    def __init__(self, message: str, current: dict | None):
        super().__init__(message)
        self.current = current


def add_database_flags(parser) -> None:
    """--config, --db and --processed, as every command that reads the review database takes them."""
    parser.add_argument("--config", metavar="FILE", help="the service's config (YAML, e.g. "
                                                         "/etc/sem-inspect/service.yaml): its db and processed")
    parser.add_argument("--db", metavar="PATH", help="the service's SQLite result database (default: the "
                                                     "config's db)")
    parser.add_argument("--processed", metavar="DIR", help="the service's processed folder; images are read only "
                                                           "from inside it (default: the config's processed, "
                                                           "else 'processed' beside the database)")


def database_paths(args) -> tuple[str, str | None]:
    """(db, processed) of add_database_flags' flags: --db and --processed win, then the service config's db and
    processed (--config). ReviewError when neither names a database or the config is not valid."""
    db, processed = args.db, args.processed
    if args.config is not None:
        from edge_runtime.config.service_config import ConfigError, load_service_config
        try:
            cfg = load_service_config(args.config)
        except ConfigError as exc:
            msg, path = str(exc), str(Path(args.config))
            raise ReviewError(f"--config {msg}" if msg.startswith(path) else f"--config {path}: {msg}") from None
        # leave_in_place: the images stay in the watch folder
        db, processed = db or cfg.db, processed or cfg.processed or cfg.watch
    if not db:
        raise ReviewError("give the service's config with --config FILE or its database with --db PATH")
    return db, processed


def reviewed_images(reviews: "Reviews", rows: list[dict] | None = None):
    """The images whose latest review gives a class (`rows`, default reviews.for_export()), opened once inside
    processed/ (open_image) and checked to be the content that was inspected: yields (row, open file at offset 0,
    fstat, None), or (row, None, None, why) for one that cannot be used. What export-labels exports and
    adaptation learns from, chosen by one rule."""
    from edge_runtime.digest import sha256_fileobj

    for row in reviews.for_export() if rows is None else rows:
        try:
            check_class_name(row["label"], "reviewed label")
            fh, st = open_image(reviews.processed, row["dest_path"])
        except (ReviewError, ClassNameError) as exc:
            yield row, None, None, str(exc)
            continue
        with fh:
            if row["sha256"] and sha256_fileobj(fh) != row["sha256"]:
                yield row, None, None, "content differs from the inspected image (sha256 changed since it was recorded)"
                continue
            fh.seek(0)
            yield row, fh, st, None


def split_reviewed(rows: list[dict]) -> tuple[list[dict], Conflicts]:
    """for_export() rows without the copies of one recorded content whose reviews disagree, and those
    conflicts by result id (edge_runtime/review/conflicts.py)."""
    return split_conflicts(rows, key=lambda row: (row["sha256"], row["label"], row["result_id"]))


def open_image(root: Path | None, path: str | os.PathLike) -> tuple[BinaryIO, os.stat_result]:
    """The one check behind serving and exporting images: `path` opened once, only if it is a regular file
    inside `root` reached without following a symbolic link (edge_runtime/safeopen.py: open_beneath), so a
    link swapped in after any check cannot lead outside. Returns the open file and its fstat; Forbidden
    (outside, or a link in the way) or NotFound (absent, not a regular file)."""
    if root is None:
        raise NotFound("no processed folder is configured")
    try:
        return open_beneath(root, path)
    except NotBeneath:
        raise Forbidden(f"image is outside the processed folder {root} (symbolic links are not followed): "
                        f"{path}") from None
    except FileNotFoundError:
        raise NotFound(f"image file is missing: {path}") from None
    except NotRegularFile as exc:
        raise NotFound(f"not a file: {path} ({exc.strerror})") from None
    except OSError as exc:
        raise NotFound(f"image file cannot be read: {path}: {exc.strerror or exc}") from None


def check_reviewer(name) -> str:
    if not isinstance(name, str):
        raise ReviewError("reviewer must be text")
    name = name.strip()
    if not name:
        raise ReviewError("reviewer is required: enter the operator name")
    if len(name) > MAX_REVIEWER:
        raise ReviewError(f"reviewer is longer than {MAX_REVIEWER} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise ReviewError("reviewer must not contain control characters")
    return name


FIRST_DAY, LAST_DAY = _dt.date(1970, 1, 1), _dt.date.max - _dt.timedelta(days=1)   # a day after it must exist


def _day(value: str, what: str) -> str:
    try:
        day = _dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ReviewError(f"{what} must be a date YYYY-MM-DD, got {value!r}") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise ReviewError(f"{what} must lie between {FIRST_DAY} and {LAST_DAY}, got {value!r}")
    return day.isoformat()


def top3(row: dict) -> tuple[list[list], bool]:
    """Stage-2 top-3 [[class, probability], ...] and whether it is complete. Results recorded before the
    probabilities were stored only have the top-1 (defect_class, confidence); clean ones have none."""
    if row.get("stage2_probs"):
        probs = json.loads(row["stage2_probs"])
        return [[c, p] for c, p in sorted(probs.items(), key=lambda kv: (-kv[1], kv[0]))[:3]], True
    if row.get("defect_class"):
        return [[row["defect_class"], row["confidence"]]], False
    return [], True


# The queue's rows: the result, its bundle's threshold and its latest review.
_ROWS = f"""(
    SELECT r.id, r.name, r.dest_path, r.label AS model_label, r.stage1_score, r.defect_class, r.confidence,
           r.review AS flagged, r.recorded_at, r.bundle_id, r.variant, r.stage2_probs, r.state AS file_state,
           b.stage1_threshold AS threshold, abs(r.stage1_score - b.stage1_threshold) AS margin,
           v.id AS review_id, v.old_label, v.new_label, v.reviewer, v.reviewed_at,
           coalesce(v.new_label, r.label) AS current_label,
           CASE WHEN v.id IS NULL THEN 'unreviewed' WHEN v.new_label = '{UNUSABLE}' THEN 'unusable'
                WHEN v.new_label = r.label THEN 'confirmed' ELSE 'corrected' END AS review_state
    FROM results r
    LEFT JOIN bundles b ON b.id = r.bundle_id
    LEFT JOIN (SELECT result_id, max(id) AS latest FROM reviews GROUP BY result_id) l ON l.result_id = r.id
    LEFT JOIN reviews v ON v.id = l.latest
    WHERE r.outcome = 'inspected'
)"""
_ORDER = "ORDER BY flagged = 1 DESC, CASE WHEN flagged = 1 THEN confidence END, margin IS NULL, margin, id"


class Reviews:
    """The review records of one store. Thread-safe: one connection, one lock (the page has few users)."""

    def __init__(self, store: Store, processed: str | os.PathLike | None, taxonomy: list[str] | None = None):
        self.store = store
        self.db = store.db
        self.lock = threading.Lock()
        self.processed = Path(processed).resolve() if processed is not None else None
        self.taxonomy = list(taxonomy) if taxonomy else self._stored_taxonomy()
        if not self.taxonomy:
            raise ReviewError(f"{store.path}: no model bundle is recorded in this database (results from before "
                              "provenance); give the bundle (--models BUNDLE) for the class list")
        try:        # the class list may come from the database file, which others can write
            for name in self.taxonomy:
                check_class_name(name, "taxonomy")
        except ClassNameError as exc:
            raise ReviewError(f"{store.path}: {exc}") from None
        self.labels = self.taxonomy + [UNUSABLE]

    def _stored_taxonomy(self) -> list[str]:
        row = self.db.execute("SELECT taxonomy FROM bundles ORDER BY first_seen DESC, id LIMIT 1").fetchone()
        if row is None:
            return []
        try:
            taxonomy = json.loads(row[0])
        except (TypeError, ValueError, RecursionError):
            taxonomy = None
        if not isinstance(taxonomy, list):
            raise ReviewError(f"{self.store.path}: the recorded bundle's taxonomy is not a list of class names")
        return taxonomy

    # -- reads -------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        with self.lock:
            bundles = [dict(r) for r in self.db.execute(
                "SELECT id, path, stage1_threshold, stage2_review_floor, first_seen FROM bundles ORDER BY first_seen")]
        return {"taxonomy": self.taxonomy, "labels": self.labels, "states": list(STATES), "bundles": bundles}

    def queue(self, *, label: str | None = None, state: str = "unreviewed", date_from: str | None = None,
              date_to: str | None = None, limit: int = 100, offset: int = 0) -> dict:
        """A page of the queue under the filters: {"total": n, "offset", "items": [...]}. Dates are UTC days
        of recorded_at, both ends included."""
        where, args = [], []
        if label is not None:
            if label not in self.labels:
                raise ReviewError(f"unknown label {label!r} (one of {', '.join(self.labels)})")
            where.append("current_label = ?")
            args.append(label)
        if state not in STATES:
            raise ReviewError(f"unknown review state {state!r} (one of {', '.join(STATES)})")
        if state == "reviewed":
            where.append("review_id IS NOT NULL")
        elif state != "all":
            where.append("review_state = ?")
            args.append(state)
        if date_from is not None:
            where.append("recorded_at >= ?")
            args.append(_day(date_from, "from"))
        if date_to is not None:
            day = _dt.date.fromisoformat(_day(date_to, "to")) + _dt.timedelta(days=1)
            where.append("recorded_at < ?")
            args.append(day.isoformat())
        if not (isinstance(limit, int) and 1 <= limit <= MAX_PAGE):
            raise ReviewError(f"limit must be 1..{MAX_PAGE}")
        if not (isinstance(offset, int) and offset >= 0):
            raise ReviewError("offset must be >= 0")
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        with self.lock:
            total = self.db.execute(f"SELECT count(*) FROM {_ROWS}{cond}", args).fetchone()[0]
            rows = [dict(r) for r in self.db.execute(f"SELECT * FROM {_ROWS}{cond} {_ORDER} LIMIT ? OFFSET ?",
                                                     [*args, limit, offset])]
            shadows = self.store.shadows_of(r["id"] for r in rows)
        return {"total": total, "offset": offset, "items": [self._item(r, shadows) for r in rows]}

    def item(self, result_id: int) -> dict:
        with self.lock:
            row = self.db.execute(f"SELECT * FROM {_ROWS} WHERE id = ?", (result_id,)).fetchone()
            shadows = self.store.shadows_of([result_id])
        if row is None:
            raise NotFound(f"no inspected result with id {result_id}")
        return self._item(dict(row), shadows)

    @staticmethod
    def _item(row: dict, shadows: dict) -> dict:
        top, complete = top3(row)
        review = None
        if row["review_id"] is not None:
            review = {"id": row["review_id"], "old_label": row["old_label"], "new_label": row["new_label"],
                      "reviewer": row["reviewer"], "reviewed_at": row["reviewed_at"]}
        return {"id": row["id"], "name": row["name"], "model_label": row["model_label"],
                "label": row["current_label"], "state": row["review_state"], "flagged": bool(row["flagged"]),
                "stage1_score": row["stage1_score"], "threshold": row["threshold"], "margin": row["margin"],
                "confidence": row["confidence"], "top3": top, "top3_complete": complete,
                "bundle_id": row["bundle_id"], "variant": row["variant"], "recorded_at": row["recorded_at"],
                "file_state": row["file_state"], "review": review,
                # a candidate bundle's answers on this image (shadow runs), beside the model's; never the result
                "shadow": [{"candidate_id": s["candidate_id"], "label": s["label"], "stage1_score": s["stage1_score"],
                            "confidence": s["confidence"], "agree": bool(s["agree"]), "error": s["error"]}
                           for s in shadows.get(row["id"], [])]}

    def summary(self) -> dict:
        """Counts per label (model's and current), per review state, the corrections made (model label ->
        operator label) and, per bundle, how often the operators agreed with the model."""
        with self.lock:
            rows = [dict(r) for r in self.db.execute(
                f"SELECT model_label, current_label, review_state, bundle_id, flagged, count(*) AS n FROM {_ROWS} "
                "GROUP BY model_label, current_label, review_state, bundle_id, flagged")]
            reviews = self.db.execute("SELECT count(*) FROM reviews").fetchone()[0]

        def counts():
            return {"model": 0, "current": 0, "reviewed": 0, "confirmed": 0, "corrected_from": 0, "corrected_to": 0}
        per_label = {lab: counts() for lab in self.labels}
        states = {"unreviewed": 0, "confirmed": 0, "corrected": 0, "unusable": 0}
        corrections: dict[tuple[str, str], int] = {}
        bundles: dict[str, dict] = {}
        for r in rows:
            model, now, state, n = r["model_label"], r["current_label"], r["review_state"], r["n"]
            per_label.setdefault(model, counts())["model"] += n
            per_label.setdefault(now, counts())["current"] += n
            states[state] += n
            b = bundles.setdefault(r["bundle_id"] or "unknown", {"results": 0, "reviewed": 0, "confirmed": 0,
                                                                  "corrected": 0, "unusable": 0})
            b["results"] += n
            if state == "unreviewed":
                continue
            per_label[model]["reviewed"] += n
            b["reviewed"] += n
            b[state] += n
            if state == "confirmed":
                per_label[model]["confirmed"] += n
            elif state == "corrected":
                per_label[model]["corrected_from"] += n
                per_label[now]["corrected_to"] += n
                corrections[(model, now)] = corrections.get((model, now), 0) + n
        for b in bundles.values():
            judged = b["confirmed"] + b["corrected"]
            b["model_accuracy"] = round(b["confirmed"] / judged, 4) if judged else None
        return {"results": sum(r["n"] for r in rows), "flagged": sum(r["n"] for r in rows if r["flagged"]),
                "reviews": reviews,
                "states": states, "per_label": per_label,
                "corrections": [{"from": a, "to": b, "count": n}
                                for (a, b), n in sorted(corrections.items(), key=lambda kv: (-kv[1], kv[0]))],
                "bundles": bundles}

    def conflicts(self) -> dict:
        """Reviews that disagree, as export and adaptation leave them out: {"conflicts": [{"sha256", "items":
        [{"id", "name", "label", "model_label", "review_id", "reviewer", "reviewed_at"}, ...]}, ...] (by first
        result id), "images": n}. Reviewing one item again so the labels agree removes its conflict."""
        rows = self.for_export()
        by_id = {row["result_id"]: row for row in rows}
        _, conflicts = split_reviewed(rows)
        keys = ("name", "label", "model_label", "review_id", "reviewer", "reviewed_at")
        listed = [{"sha256": digest, "items": [{"id": rid, **{k: by_id[rid][k] for k in keys}} for rid, _ in seen]}
                  for digest, seen in sorted(conflicts.items(), key=lambda kv: kv[1][0][0])]
        return {"conflicts": listed, "images": sum(len(c["items"]) for c in listed)}

    def open_image(self, result_id: int) -> tuple[BinaryIO, os.stat_result, str]:
        """The result's image, opened from inside the processed folder (open_image): (file, fstat, its path)."""
        with self.lock:
            row = self.db.execute("SELECT dest_path FROM results WHERE id = ? AND outcome = 'inspected'",
                                  (result_id,)).fetchone()
        if row is None:
            raise NotFound(f"no inspected result with id {result_id}")
        fh, st = open_image(self.processed, row[0])
        return fh, st, row[0]

    def for_export(self) -> list[dict]:
        """Every result whose latest review gives it a class (confirmed or corrected; not unusable), by id."""
        with self.lock:
            return [dict(r) for r in self.db.execute(
                "SELECT r.id AS result_id, r.name, r.dest_path, r.sha256, r.label AS model_label, r.bundle_id, "
                "v.id AS review_id, v.new_label AS label, v.reviewer, v.reviewed_at "
                "FROM results r JOIN reviews v ON v.result_id = r.id "
                "WHERE v.id = (SELECT max(id) FROM reviews WHERE result_id = r.id) AND v.new_label != ? "
                "AND r.outcome = 'inspected' ORDER BY r.id", (UNUSABLE,))]

    # -- the one write -----------------------------------------------------------------------------------
    def add(self, result_id: int, new_label, reviewer, expected_review_id) -> dict:
        """Record one review: confirm (the label in force), correct (another class) or `unusable`."""
        if not isinstance(new_label, str) or new_label not in self.labels:
            raise ReviewError(f"unknown label {new_label!r} (one of {', '.join(self.labels)})")
        reviewer = check_reviewer(reviewer)
        if strict.problems(expected_review_id, REVIEW_ID):
            raise ReviewError("expected_review_id must be the id of the review you saw (0 if none)")

        def write():
            row = self.db.execute("SELECT label FROM results WHERE id = ? AND outcome = 'inspected'",
                                  (result_id,)).fetchone()
            if row is None:
                raise NotFound(f"no inspected result with id {result_id}")
            latest = self.db.execute("SELECT * FROM reviews WHERE result_id = ? ORDER BY id DESC LIMIT 1",
                                     (result_id,)).fetchone()
            latest = dict(latest) if latest else None
            seen = latest["id"] if latest else 0
            if seen != expected_review_id:
                raise Conflict(f"result {result_id} was reviewed meanwhile"
                               + (f" by {latest['reviewer']} ({latest['new_label']})" if latest else ""), latest)
            old = latest["new_label"] if latest else row[0]
            review = {"result_id": result_id, "supersedes": seen, "old_label": old, "new_label": new_label,
                      "reviewer": reviewer, "reviewed_at": utc_now()}
            try:
                cur = self.db.execute("INSERT INTO reviews (result_id, supersedes, old_label, new_label, reviewer, "
                                      "reviewed_at) VALUES (:result_id, :supersedes, :old_label, :new_label, "
                                      ":reviewer, :reviewed_at)", review)
            except sqlite3.IntegrityError:      # another process won the same race
                raise Conflict(f"result {result_id} was reviewed meanwhile", None) from None
            return {"id": cur.lastrowid, **review}

        with self.lock:
            return self.store.transaction(write)


def open_reviews(db: str | os.PathLike, processed: str | os.PathLike | None = None,
                 models: str | os.PathLike | None = None) -> Reviews:
    """The review records of an existing result database (never creates one). `processed` defaults to the
    folder `processed` beside the database, as the service's own default; `models` gives the class list for a
    database that records no bundle. ReviewError (or StorageError) says what is wrong."""
    db_path = Path(db).expanduser()
    if not db_path.is_file():
        raise ReviewError(f"--db {db_path}: no such result database (the service's `db:` file)")
    folder = Path(processed).expanduser() if processed else db_path.parent / "processed"
    if not folder.is_dir():
        raise ReviewError(f"processed folder {folder} does not exist"
                          + ("" if processed else "; give the service's processed folder with --processed DIR"))
    taxonomy = None
    if models:
        from edge_runtime.bundle import BundleError, load_bundle
        try:
            taxonomy = list(load_bundle(models, verify_all=False).taxonomy)
        except BundleError as exc:
            raise ReviewError(str(exc)) from None
    store = Store(db_path)
    try:
        return Reviews(store, folder, taxonomy)
    except BaseException:
        store.close()
        raise
