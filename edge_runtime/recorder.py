"""The watch service's exactly-once recorder: each complete image is recorded once, across crashes and kill -9.

Per image, in this order:
    1. read the bytes once; key = sha256(content) + "/" + file name. If the key is already in the database,
       the image was recorded before a crash: only finish its move (step 4), never re-record.
    2. inspect those same bytes (or decide why it must be quarantined: unsupported type, too large, corrupt,
       truncated, unreadable). If a decode fails while the file is still changing, it goes back to settle
       instead of being quarantined.
    3. insert the result (state 'recorded', destination chosen now: processed/, quarantine/ or in place) into
       the open SQLite transaction. Results are group-committed: up to `commit_every` images per transaction,
       held open at most `commit_seconds`, committed at once when nothing else is waiting. When COMMIT returns
       (synchronous=FULL), the group's results are durable.
    4. only then, per image: append the JSONL line (with the row id), move the file (rename; across file
       systems copy + fsync + rename + unlink); quarantined files get NAME.reason.txt beside them.
    5. mark the rows 'done' and 'journaled' (deferred into the next transaction; the JSONL file is fsynced
       before its rows are flagged).
A kill at any point leaves one of: nothing recorded and the file in the folder (-> processed again); recorded
but not moved (-> on restart the key is found, the move is finished); moved but not marked (-> on restart the
row is marked done). An image is never moved before its result is committed, so an image in processed/ always
has exactly one row. The JSONL file is derived from the database (edge_runtime/journal.py), so it also holds
each result exactly once.

The folder-watching loop (edge_runtime/watch.py) uses only the public methods of Recorder: it hands over
complete files (handle) and asks which files it must leave alone (holds); everything else stays in here.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

from edge_runtime import fileops
from edge_runtime.digest import sha256_bytes, sha256_file
from edge_runtime.exits import WatchError
from edge_runtime.journal import Journal, row_to_json
from edge_runtime.preprocess import SUPPORTED_SUFFIXES, ImageError
from edge_runtime.service_config import ServiceConfig
from edge_runtime.service_stats import ServiceStats
from edge_runtime.store import Store, StorageError, db_text, is_disk_full, utc_now

log = logging.getLogger("edge_inspect")


class Recorder:
    """Records complete files exactly once into the store (and the journal), then moves them.

    The watching loop's interface:
        reconcile()                     at start-up: finish what an interruption left
        handle(name, size, mtime_ns)    one complete file; returns False when the file changed since it was
                                        judged complete (the loop lets it settle again)
        holds(name, size, mtime_ns)     True while the loop must not queue that file: its result is in the
                                        open group, it could not be moved, or it was recorded in place
        forget_absent(present)          names no longer in the folder
        commit_if_due(waiting)          group commit (waiting: more files are about to be handled)
        commit_deadline()               when the open group must be committed (monotonic), or None
        has_open_group                  results inserted but not yet committed
        idle()                          nothing to do: sync the JSONL, write the deferred marks
        flush()                         at stop: everything committed, synced and marked
    """

    MAX_UNEXPECTED_IN_A_ROW = 10
    JOURNAL_SYNC_EVERY = 32     # one JSONL fsync per this many results (and whenever the folder is idle)

    def __init__(self, cfg: ServiceConfig, inspector, store: Store, journal: Journal | None, stats: ServiceStats):
        self.cfg = cfg
        self.watch = Path(cfg.watch)
        self.processed = Path(cfg.processed) if cfg.processed else None
        self.quarantine = Path(cfg.quarantine)
        self.inspector = inspector
        self.variant = inspector.bundle.variant
        self.bundle_id = inspector.bundle.bundle_id     # model provenance, recorded with every result
        self.store = store
        self.journal = journal
        self.stats = stats
        self._stuck: dict[str, tuple[int, int]] = {}       # cannot be moved now; retried when it changes
        self._in_place: dict[str, tuple[int, int]] = {}    # leave-in-place: already recorded
        self._batch: list[tuple[dict, Path, bool]] = []    # inserted, not yet committed (not moved)
        self._batch_names: set[str] = set()
        self._batch_started = 0.0
        self._done_ids: list[int] = []          # moved; marked 'done' with the next transaction
        self._unsynced_ids: list[int] = []      # JSONL line written, not yet fsynced
        self._journaled_ids: list[int] = []     # JSONL line durable; flagged with the next transaction
        self._unexpected = 0

    # -- the loop's interface ---------------------------------------------------------------------------
    def holds(self, name: str, size: int, mtime_ns: int) -> bool:
        sig = (size, mtime_ns)
        return name in self._batch_names or self._stuck.get(name) == sig or self._in_place.get(name) == sig

    def forget_absent(self, present: set[str]) -> None:
        for table in (self._stuck, self._in_place):
            for name in [n for n in table if n not in present]:
                del table[name]

    @property
    def has_open_group(self) -> bool:
        return bool(self._batch)

    @property
    def pending_marks(self) -> int:
        """Rows whose 'done' or 'journaled' mark is not written yet (0 after flush())."""
        return len(self._done_ids) + len(self._unsynced_ids) + len(self._journaled_ids)

    def commit_deadline(self) -> float | None:
        return self._batch_started + self.cfg.commit_seconds if self._batch else None

    def commit_if_due(self, waiting: bool) -> None:
        """Group commit: commit the open group when it is full, has been open commit_seconds, or when nothing
        else is waiting."""
        if self._batch and (not waiting or len(self._batch) >= self.cfg.commit_every
                            or time.monotonic() - self._batch_started >= self.cfg.commit_seconds):
            self._commit()

    def idle(self) -> None:
        if not self._batch:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            self._commit()
        if self.journal:
            self._sync_journal()
        if self._done_ids or self._journaled_ids:
            self.store.update(self._done_ids, self._journaled_ids)
            self._done_ids, self._journaled_ids = [], []

    # -- one image --------------------------------------------------------------------------------------
    def handle(self, name: str, size: int, mtime_ns: int) -> bool:
        path = self.watch / name
        if self.cfg.leave_in_place and self.store.seen_in_place(db_text(path), size, mtime_ns):
            self._in_place[name] = (size, mtime_ns)      # recorded in an earlier run; not read again
            return True
        data, digest, reason = None, None, None
        try:
            if size > self.cfg.max_file_bytes:
                digest = sha256_file(path)
                reason = f"file too large ({size} bytes > {self.cfg.max_file_bytes})"
            else:
                with open(path, "rb") as fh:
                    data = fh.read(self.cfg.max_file_bytes + 1)
                if len(data) != size:
                    return False        # changed since it was judged complete: settle again
                digest = sha256_bytes(data)
        except FileNotFoundError:
            return True                 # taken away before we got to it
        except OSError as exc:
            reason = f"cannot read file: {exc.strerror or exc}"
        key = f"{digest}/{name}" if digest else f"unreadable:{size}:{mtime_ns}/{name}"
        row = self.store.get(key)
        if row is not None:
            # Recorded before an interruption (or the very same file dropped again): finish, never re-record.
            self._finish(row, path, recovered=True)
            return True
        result = None
        if reason is None and Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
            reason = (f"unsupported file type {Path(name).suffix or '(no extension)'!r} "
                      f"(supported: {' '.join(SUPPORTED_SUFFIXES)})")
        if reason is None:
            try:
                result = self.inspector.inspect(data, path=str(path))
                self._unexpected = 0
            except ImageError as exc:
                if self._changed(path, size, mtime_ns):
                    return False        # still being written: settle again
                reason = str(exc)
            except Exception as exc:    # one bad file must not stop the service...
                self._unexpected += 1
                log.exception("%s: unexpected error while inspecting", name)
                if self._unexpected >= self.MAX_UNEXPECTED_IN_A_ROW:   # ...but a broken runtime must
                    raise WatchError(f"{self._unexpected} images in a row failed unexpectedly (last: "
                                     f"{type(exc).__name__}: {exc}); stopping, the rest stay in {self.watch}")
                reason = f"could not be inspected: {type(exc).__name__}: {exc}"
        self._record(name, path, size, mtime_ns, digest, key, result, reason)
        return True

    @staticmethod
    def _changed(path: Path, size: int, mtime_ns: int) -> bool:
        """Whether the file changed (or went) since it was judged complete."""
        try:
            st = os.stat(path)
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            log.info("%s is still changing; waiting for it to settle", path.name)
            return True
        return False

    def _destination(self, name: str, digest: str | None, quarantined: bool) -> Path:
        folder = self.quarantine if quarantined else self.processed
        if folder is None:
            return self.watch / name
        safe = db_text(name)        # stored in the database: must be valid UTF-8
        dest = folder / safe
        if not dest.exists() and not self.store.dest_taken(db_text(dest)):
            return dest
        stem, suffix = Path(safe).stem, Path(safe).suffix
        tag = (digest or "unreadable")[:12]
        for i in range(10000):
            dest = folder / (f"{stem}.{tag}{suffix}" if i == 0 else f"{stem}.{tag}.{i}{suffix}")
            if not dest.exists() and not self.store.dest_taken(db_text(dest)):
                return dest
        raise WatchError(f"{folder}: no free name for {name}")

    def _record(self, name, path, size, mtime_ns, digest, key, result, reason) -> None:
        quarantined = reason is not None
        in_place = self.processed is None and not quarantined
        dest = self._destination(name, digest, quarantined)
        row = {"key": key, "name": db_text(name), "src_path": db_text(path), "dest_path": db_text(dest),
               "size": size, "mtime_ns": mtime_ns, "sha256": digest,
               "outcome": "quarantined" if quarantined else "inspected", "reason": reason,
               "variant": self.variant, "bundle_id": self.bundle_id, "state": "done" if in_place else "recorded",
               "journaled": 0 if self.journal else 1, "recorded_at": utc_now()}
        if result is not None:
            row.update(label=result.label, stage1_score=round(result.stage1_score, 6),
                       defect_class=result.defect_class, confidence=round(result.confidence, 6),
                       review=int(result.review), latency_ms=round(result.latency_ms, 3))
            if result.stage2_probs is not None:
                row["stage2_probs"] = json.dumps(result.to_dict()["stage2_probs"])
        # (3) into the open group transaction; nothing is done to the file before the commit returns.
        row["id"] = self.store.insert(row)
        if not self._batch:
            self._batch_started = time.monotonic()
        self._batch.append((row, path, in_place))
        self._batch_names.add(name)

    def _commit(self) -> None:
        """Commit the group, then (4) journal and move each of its images, (5) deferred marks."""
        self.store.commit(self._done_ids, self._journaled_ids)
        self._done_ids, self._journaled_ids = [], []
        batch, self._batch = self._batch, []
        self._batch_names.clear()
        for row, path, in_place in batch:
            self._journal(row)
            if in_place:
                self._in_place[path.name] = (row["size"], row["mtime_ns"])
            else:
                self._finish(row, path)
            self.stats.count(row)
            _log_result(row, Path(row["dest_path"]), moved=not in_place)

    def _journal(self, row: dict) -> None:
        if self.journal:
            self._append_journal(row)
            self._unsynced_ids.append(row["id"])
            if len(self._unsynced_ids) >= self.JOURNAL_SYNC_EVERY:
                self._sync_journal()

    def _sync_journal(self) -> None:
        if self._unsynced_ids:
            try:
                self.journal.sync()
            except OSError as exc:
                raise StorageError(f"{self.journal.path}: cannot sync: {exc.strerror or exc}",
                                   is_disk_full(exc)) from exc
            self._journaled_ids.extend(self._unsynced_ids)
            self._unsynced_ids = []

    def _append_journal(self, row: dict) -> None:
        try:
            self.journal.append(row_to_json(row))
        except OSError as exc:
            raise StorageError(f"{self.journal.path}: cannot append result: {exc.strerror or exc}",
                               is_disk_full(exc)) from exc

    def _finish(self, row: dict, path: Path, recovered: bool = False) -> None:
        """Move a recorded file to its destination (idempotent) and schedule the row's 'done' mark."""
        dest = Path(row["dest_path"])
        if dest == path:
            try:
                st = os.stat(path)
                self._in_place[path.name] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
        else:
            try:
                if dest.exists() and path.exists():
                    # Copied across file systems before an interruption, or the same file dropped again.
                    if fileops.same_content(path, dest):
                        path.unlink()
                    else:
                        raise FileExistsError(errno.EEXIST, f"{dest} exists with other content")
                elif path.exists():
                    fileops.move(path, dest)
            except OSError as exc:
                if is_disk_full(exc):
                    raise StorageError(f"cannot move {path.name} to {dest.parent}: {exc.strerror or exc}",
                                       True) from exc
                log.error("%s: recorded (id %s) but cannot move it to %s: %s; will retry on restart",
                          path.name, row["id"], dest.parent, exc.strerror or exc)
                try:
                    st = os.stat(path)
                    self._stuck[path.name] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    pass
                return
        if row["outcome"] == "quarantined":
            note = dest.with_name(dest.name + ".reason.txt")
            try:
                if not note.exists():
                    note.write_text(f"{row['name']}: {row['reason']}\nrecorded {row['recorded_at']} "
                                    f"(id {row['id']}, sha256 {row['sha256']})\n", encoding="utf-8")
            except OSError as exc:
                if is_disk_full(exc):
                    raise StorageError(f"cannot write {note}: {exc.strerror or exc}", True) from exc
                log.warning("cannot write %s: %s", note, exc.strerror or exc)
        if row["state"] != "done":
            self._done_ids.append(row["id"])
        if recovered:
            self.stats.recovered()
            log.info("%s: already recorded (id %s, %s); finished its move to %s", row["name"], row["id"],
                     row["label"] or "quarantined", dest.parent)

    # -- start-up recovery ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Finish what an interruption left: rows recorded but not marked done, rows not journaled."""
        done, missing = [], []
        for row in self.store.unfinished():
            src, dest = Path(row["src_path"]), Path(row["dest_path"])
            if dest.exists():       # moved before the interruption (a same-content copy left in the
                done.append(row["id"])      # watch folder is removed when the scan finds its key)
                if row["outcome"] == "quarantined":
                    self._finish(row, dest)
            elif src.exists():
                continue            # not moved yet: the scan finds its key and finishes the move
            else:
                log.warning("%s: recorded (id %s) but the file is in neither %s nor %s; marked missing",
                            row["name"], row["id"], src.parent, dest.parent)
                missing.append(row["id"])
        journaled = []
        rows = self.store.unjournaled()
        if self.journal and rows:
            already = self.journal.ids_in_tail()
            for row in rows:
                if row["id"] not in already:
                    self._append_journal(row)
                journaled.append(row["id"])
            self.journal.sync()
            log.info("journal: %d result(s) brought up to date in %s", len(rows), self.journal.path)
        elif rows and not self.journal:
            journaled = [r["id"] for r in rows]     # JSONL switched off since: nothing to write
        self.store.update(done + self._done_ids, journaled, missing)
        self._done_ids = []
        if done or missing:
            log.info("recovery: %d interrupted move(s) confirmed, %d missing", len(done), len(missing))


def _log_result(row: dict, dest: Path, moved: bool) -> None:
    """One log line per recorded image, naming where it went when it was moved."""
    where = f" -> {dest}" if moved else ""
    if row["outcome"] == "quarantined":
        log.warning("%s: quarantined: %s%s", row["name"], row["reason"], where)
    elif row["defect_class"]:
        log.info("%s: %s (P(defect) %.3f, confidence %.3f%s) %.1f ms%s", row["name"], row["label"],
                 row["stage1_score"], row["confidence"], ", REVIEW" if row["review"] else "",
                 row["latency_ms"], where)
    else:
        log.info("%s: clean (P(defect) %.3f) %.1f ms%s", row["name"], row["stage1_score"], row["latency_ms"], where)
