"""The watch service's exactly-once recorder: each complete image is recorded once, across crashes and kill -9.

Per image, in this order:
    1. open it without blocking or following a symlink, check on the opened descriptor that it is the regular
       file the loop judged complete (same device, inode, size, mtime, ctime), and read the bytes once;
       key = sha256(content) + "/" + file name (edge_runtime/names.py). If the key is already in the database,
       the image was recorded before a crash: only finish its move (step 4), never re-record. A FIFO, socket or
       device is not opened: it is quarantined as such. A file this process cannot read (permissions, I/O
       error) is left where it is and retried when it changes (e.g. chmod).
    2. inspect those same bytes (or decide why it must be quarantined: unsupported type, too large, corrupt,
       truncated, over the decode memory budget). Any failure to decode is that file's problem. A file that
       fails to decode while it may still be written (not renamed in, not closed by its writer, not left alone
       for `incomplete_seconds`) is handed back to the loop to retry, not quarantined; a decode that fails
       because the file changed meanwhile goes back to settle.
    3. insert the result (state 'recorded', destination chosen now: processed/, quarantine/ or in place) into
       the open SQLite transaction. Results are group-committed: up to `commit_every` images per transaction,
       held open at most `commit_seconds`, committed at once when nothing else is waiting. Before each commit
       the watch folder and the database are checked to be the ones the service started with (a folder deleted
       and re-created around the database would take the results with it). When COMMIT returns
       (synchronous=FULL), the group's results are durable.
    4. only then, per image: append the JSONL line (with the row id), check that the file is still the version
       that was read and move it (rename; across file systems copy + fsync + rename + unlink); quarantined files
       get NAME.reason.txt beside them. A file replaced or rewritten since it was read is not moved: its row
       (the version that was read, now gone) is marked 'missing' and the new content is inspected as a new
       image.
    5. mark the rows 'done' and 'journaled' (deferred into the next transaction; the JSONL file is fsynced
       before its rows are flagged).
A kill at any point leaves one of: nothing recorded and the file in the folder (-> processed again); recorded
but not moved (-> on restart the key is found, the move is finished); moved but not marked (-> on restart the
row is marked done). An image is never moved before its result is committed, so an image in processed/ always
has exactly one row. The JSONL file is derived from the database (edge_runtime/db/journal.py), so it also holds
each result exactly once.

The folder-watching loop (edge_runtime/service/watch.py) uses only the public methods of Recorder: it hands over
complete files (handle) and asks which files it must leave alone (holds); everything else stays in here.
"""
from __future__ import annotations

import enum
import errno
import json
import logging
import os
import stat
import time
from pathlib import Path

from edge_runtime.config.service_config import ServiceConfig
from edge_runtime.db.journal import Journal, row_to_json
from edge_runtime.db.store import StorageError, Store, is_disk_full, utc_now
from edge_runtime.digest import sha256_bytes, sha256_fileobj
from edge_runtime.exits import WatchError
from edge_runtime.names import db_text, name_key, name_of_key, shown
from edge_runtime.preprocess import SUPPORTED_SUFFIXES, ImageError
from edge_runtime.safeopen import NotRegularFile, kind_of, open_regular
from edge_runtime.service import fileops
from edge_runtime.service.fileops import FileChanged, FileSig
from edge_runtime.service.stats import ServiceStats

log = logging.getLogger("edge_inspect")

NOTE_SUFFIX = ".reason.txt"


class Handled(enum.Enum):
    DONE = "done"               # recorded, finished, held (unreadable) or gone: the loop forgets it
    RESETTLE = "resettle"       # changed since it was judged complete: let it settle again
    RETRY = "retry"             # failed to decode but may still be being written: retry later


class Recorder:
    """Records complete files exactly once into the store (and the journal), then moves them.

    The watching loop's interface:
        reconcile()                     at start-up: finish what an interruption left
        handle(name, seen, final)       one complete file as the loop saw it (FileSig); final: its writer is
                                        surely done (renamed in, closed, or left alone incomplete_seconds), so
                                        a file that does not decode is quarantined instead of retried.
                                        Returns Handled.DONE, RESETTLE or RETRY
        holds(name, sig)                True while the loop must not queue that file: its result is in the
                                        open group, it could not be moved or read, or it was recorded in place
        take_requeued()                 names to look at again (changed after they were read)
        check_places()                  WatchError unless the watch folder and the database are still the
                                        ones the service started with
        forget_absent(present)          names no longer in the folder
        commit_if_due(waiting)          group commit (waiting: more files are about to be handled)
        commit_deadline()               when the open group must be committed (monotonic), or None
        has_open_group                  results inserted but not yet committed
        idle()                          nothing to do: sync the JSONL, write the deferred marks
        flush()                         at stop: everything committed, synced and marked
        unreadable                      names left in the folder because they cannot be read
    """

    MAX_UNEXPECTED_IN_A_ROW = 10
    JOURNAL_SYNC_EVERY = 32     # one JSONL fsync per this many results (and whenever the folder is idle)

    def __init__(self, cfg: ServiceConfig, inspector, store: Store, journal: Journal | None, stats: ServiceStats):
        self.cfg = cfg
        self.watch = Path(cfg.watch)
        self.processed = Path(cfg.processed) if cfg.processed else None
        self.quarantine = Path(cfg.quarantine)
        self.set_inspector(inspector)
        self.shadow = None          # a candidate bundle beside the current one (edge_runtime/service/shadow.py)
        self.store = store
        self.journal = journal
        self.stats = stats
        st = os.stat(self.watch)
        self._watch_id = (st.st_dev, st.st_ino)
        self._stuck: dict[str, FileSig] = {}        # cannot be moved now; retried when it changes
        self._in_place: dict[str, FileSig] = {}     # leave-in-place: already recorded
        self._unreadable: dict[str, FileSig] = {}   # cannot be read now; retried when it changes (chmod)
        self._batch: list[tuple[dict, Path, bool, FileSig]] = []    # inserted, not committed (not moved)
        self._batch_names: set[str] = set()
        self._batch_started = 0.0
        self._done_ids: list[int] = []          # moved; marked 'done' with the next transaction
        self._missing_ids: list[int] = []       # the version that was read is gone; marked with the next one
        self._unsynced_ids: list[int] = []      # JSONL line written, not yet fsynced
        self._journaled_ids: list[int] = []     # JSONL line durable; flagged with the next transaction
        self._requeue: list[str] = []
        self._unexpected = 0

    # -- the loop's interface ---------------------------------------------------------------------------
    def set_inspector(self, inspector) -> None:
        """The bundle that inspects the next image (a swap: the image in hand was finished on the old one)."""
        self.inspector = inspector
        self.variant = inspector.bundle.variant
        self.bundle_id = inspector.bundle.bundle_id     # model provenance, recorded with every result

    def holds(self, name: str, sig: FileSig) -> bool:
        return (name in self._batch_names or self._stuck.get(name) == sig or self._in_place.get(name) == sig
                or self._unreadable.get(name) == sig)

    def take_requeued(self) -> list[str]:
        names, self._requeue = self._requeue, []
        return names

    @property
    def unreadable(self) -> list[str]:
        return sorted(self._unreadable)

    def forget_absent(self, present: set[str]) -> None:
        for table in (self._stuck, self._in_place, self._unreadable):
            for name in [n for n in table if n not in present]:
                del table[name]

    def check_places(self) -> None:
        """Stop (WatchError) unless the watch folder and the result database are still the ones this service
        started with: a folder deleted and re-created, or a database deleted, must not swallow results."""
        try:
            st = os.stat(self.watch)
        except FileNotFoundError:
            raise WatchError(f"watch folder {self.watch} no longer exists") from None
        except OSError as exc:
            raise WatchError(f"watch folder {self.watch}: {exc.strerror or exc}") from None
        if (st.st_dev, st.st_ino) != self._watch_id:
            raise WatchError(f"watch folder {self.watch} was deleted and re-created (or replaced) while the service "
                             "ran; stopping: restart the service to watch the new folder")
        if not self.store.still_at_path():
            raise WatchError(f"result database {self.store.path} was deleted or replaced while the service ran "
                             "(was the folder around it deleted?); stopping without writing to it: the images "
                             "not yet committed stay where they are. Restart the service to continue")

    @property
    def has_open_group(self) -> bool:
        return bool(self._batch)

    @property
    def pending_marks(self) -> int:
        """Rows whose 'done', 'missing' or 'journaled' mark is not written yet (0 after flush())."""
        return (len(self._done_ids) + len(self._missing_ids) + len(self._unsynced_ids)
                + len(self._journaled_ids))

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
        if self._done_ids or self._journaled_ids or self._missing_ids:
            self.store.update(self._done_ids, self._journaled_ids, self._missing_ids)
            self._done_ids, self._journaled_ids, self._missing_ids = [], [], []

    # -- one image --------------------------------------------------------------------------------------
    def handle(self, name: str, seen: FileSig, final: bool = True) -> Handled:
        path = self.watch / name
        if self.cfg.leave_in_place and self.store.seen_in_place(db_text(path), seen.size, seen.mtime_ns):
            self._in_place[name] = seen      # recorded in an earlier run; not read again
            return Handled.DONE
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return Handled.DONE             # taken away before we got to it
        except OSError as exc:
            return self._hold_unreadable(name, seen, exc)
        if FileSig.of(st) != seen:
            return Handled.RESETTLE
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            return Handled.DONE             # not an input (the loop does not queue these)
        if not stat.S_ISREG(st.st_mode):    # FIFO, socket, device: never opened
            reason = f"not a regular file ({kind_of(st.st_mode)})"
            key = f"special:{seen.size}:{seen.mtime_ns}/{name_key(name)}"
            return self._decide(name, path, seen, None, key, None, reason)
        data, reason = None, None
        try:
            fh, opened = open_regular(path, follow_symlinks=False)
        except FileNotFoundError:
            return Handled.DONE
        except NotRegularFile:
            return Handled.RESETTLE         # swapped for something else since lstat: look again
        except OSError as exc:
            if exc.errno == errno.ELOOP:    # a symlink swapped in: look again (symlinks are not inputs)
                return Handled.RESETTLE
            return self._hold_unreadable(name, seen, exc)
        try:
            with fh:
                if FileSig.of(opened) != seen:
                    return Handled.RESETTLE
                if seen.size > self.cfg.max_file_bytes:
                    digest = sha256_fileobj(fh)
                    reason = f"file too large ({seen.size} bytes > {self.cfg.max_file_bytes})"
                else:
                    data = fh.read(self.cfg.max_file_bytes + 1)
                    if len(data) != seen.size:
                        return Handled.RESETTLE     # changed since it was judged complete: settle again
                    digest = sha256_bytes(data)
        except OSError as exc:
            return self._hold_unreadable(name, seen, exc)
        self._unreadable.pop(name, None)
        return self._decide(name, path, seen, digest, f"{digest}/{name_key(name)}", data, reason, final)

    def _decide(self, name, path, seen, digest, key, data, reason, final=True) -> Handled:
        row = self.store.get(key)
        if row is not None:
            # Recorded before an interruption (or the very same file dropped again): finish, never re-record.
            self._finish(row, path, seen, recovered=True)
            return Handled.DONE
        result = None
        if reason is None and Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
            reason = (f"unsupported file type {Path(name).suffix or '(no extension)'!r} "
                      f"(supported: {' '.join(SUPPORTED_SUFFIXES)})")
        gray = shared = None
        if reason is None:
            try:
                if self.shadow is not None and self.shadow.sampled(digest):
                    # decoded once for both bundles (to the larger of their inputs), and a backbone both bundles
                    # have (an adapted candidate's) run once: the candidate reuses both
                    t0 = time.perf_counter()
                    gray, shared = self.inspector.decode(data, self._decode_size()), {}
                    result = self.inspector.inspect_decoded(gray, path=str(path), t0=t0, shared=shared)
                else:
                    result = self.inspector.inspect(data, path=str(path))
                self._unexpected = 0
            except ImageError as exc:
                if self._changed(path, seen):
                    return Handled.RESETTLE     # still being written: settle again
                if exc.incomplete and not final:      # (one line per image: its outcome; this is detail)
                    log.debug("%s: %s; it may still be being written: retried when it changes, quarantined once "
                             "its writer closes it or it is left alone %gs", shown(name), exc,
                             self.cfg.incomplete_seconds)
                    return Handled.RETRY
                reason = str(exc)
            except Exception as exc:    # the runtime, not the image (decoding errors are ImageError)...
                self._unexpected += 1
                log.exception("%s: unexpected error while inspecting", shown(name))
                if self._unexpected >= self.MAX_UNEXPECTED_IN_A_ROW:   # ...a broken runtime must stop
                    self.flush()        # the results already in the group are good: keep them
                    raise WatchError(f"{self._unexpected} images in a row failed unexpectedly (last: "
                                     f"{type(exc).__name__}: {exc}); stopping, the rest stay in {self.watch}")
                reason = f"could not be inspected: {type(exc).__name__}: {exc}"
        row = self._record(name, path, seen, digest, key, result, reason)
        if result is not None and gray is not None:
            self.shadow.run(row, gray, shared)      # into the same group transaction, never instead of the result
        return Handled.DONE

    def _decode_size(self) -> tuple[int, int]:
        """The largest input a shadowed image will be resized to: this bundle's or the candidate's."""
        return max(self.inspector.size, self.shadow.inspector.size, key=lambda hw: hw[0] * hw[1])

    def _hold_unreadable(self, name: str, seen: FileSig, exc: OSError) -> Handled:
        """A file this process cannot read stays where it is (nothing is recorded) until it changes: a
        permission fixed with chmod changes its ctime, and the next look retries it."""
        if self._unreadable.get(name) != seen:
            log.warning("%s: cannot read it (%s); left in %s and retried when it changes (e.g. chmod)",
                        shown(name), exc.strerror or exc, self.watch)
        self._unreadable[name] = seen
        return Handled.DONE

    @staticmethod
    def _changed(path: Path, seen: FileSig) -> bool:
        """Whether the file changed (or went) since it was judged complete."""
        try:
            now = FileSig.of(os.lstat(path))
        except OSError:
            return True
        if now != seen:
            log.info("%s is still changing; waiting for it to settle", shown(path.name))
            return True
        return False

    def _free(self, dest: Path, quarantined: bool) -> bool:
        """Nothing (not even a dangling symlink) at dest, or at its reason note, and no row going there."""
        if os.path.lexists(dest) or self.store.dest_taken(db_text(dest)):
            return False
        return not (quarantined and os.path.lexists(dest.with_name(dest.name + NOTE_SUFFIX)))

    def _destination(self, name: str, digest: str | None, quarantined: bool) -> Path:
        """A free name in processed/ or quarantine/: the file's own name when free, else NAME.<sha256[:12]>,
        shortened to fit the file system's name limit with room for the reason note."""
        folder = self.quarantine if quarantined else self.processed
        if folder is None:
            return self.watch / name
        safe = db_text(name)        # stored in the database: must be valid UTF-8
        limit = fileops.name_max(folder) - len(NOTE_SUFFIX.encode())
        stem, suffix = os.path.splitext(safe)
        if len(suffix.encode()) > 16:   # not a real extension
            stem, suffix = safe, ""
        if len(safe.encode()) <= limit and self._free(folder / safe, quarantined):
            return folder / safe
        tag = (digest or "special")[:12]
        for i in range(10000):
            tail = f".{tag}{suffix}" if i == 0 else f".{tag}.{i}{suffix}"
            room = limit - len(tail.encode())
            dest = folder / (stem.encode()[:room].decode("utf-8", "ignore") + tail)
            if self._free(dest, quarantined):
                return dest
        raise WatchError(f"{folder}: no free name for {shown(name)}")

    def _record(self, name, path, seen: FileSig, digest, key, result, reason) -> dict:
        quarantined = reason is not None
        in_place = self.processed is None and not quarantined
        dest = self._destination(name, digest, quarantined)
        row = {"key": key, "name": db_text(name), "src_path": db_text(path), "dest_path": db_text(dest),
               "size": seen.size, "mtime_ns": seen.mtime_ns, "sha256": digest,
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
        self._batch.append((row, path, in_place, seen))
        self._batch_names.add(name)
        return row

    def _commit(self) -> None:
        """Commit the group, then (4) journal and move each of its images, (5) deferred marks."""
        self.check_places()
        self.store.commit(self._done_ids, self._journaled_ids, self._missing_ids)
        self._done_ids, self._journaled_ids, self._missing_ids = [], [], []
        batch, self._batch = self._batch, []
        self._batch_names.clear()
        for row, path, in_place, seen in batch:
            self._journal(row)
            if in_place:
                self._in_place[path.name] = seen
                moved = False
            else:
                moved = self._finish(row, path, seen)
            self.stats.count(row)
            _log_result(row, Path(row["dest_path"]), moved=moved)

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

    def _finish(self, row: dict, path: Path, seen: FileSig, recovered: bool = False) -> bool:
        """Move a recorded file to its destination (idempotent) and schedule the row's 'done' mark, unless the
        file is no longer the version that was read (`seen`). Returns whether the file was moved."""
        dest = Path(row["dest_path"])
        name = path.name
        if dest == path:                # recorded in place (leave_in_place): nothing to move
            self._in_place[name] = seen
            return False
        try:
            if os.path.lexists(dest) and os.path.lexists(path):
                # Copied across file systems before an interruption, or the same file dropped again.
                if fileops.same_content(path, dest):
                    path.unlink()
                else:
                    raise FileExistsError(errno.EEXIST, f"{dest} exists with other content")
            elif os.path.lexists(path):
                returned = fileops.move(path, dest, expect=seen)
                if returned is not None:        # swapped in under the name after the copy: a new input
                    self._requeue.append(returned.name)
        except FileChanged as exc:
            log.warning("%s changed after it was read (replaced or rewritten): not moved; it will be inspected "
                        "again as it is now%s", shown(name),
                        f" (result id {row['id']}, for the version that was read, marked missing)"
                        if row["state"] == "recorded" else "")
            if row["state"] == "recorded":
                self._missing_ids.append(row["id"])
            self._requeue.append(exc.returned.name if exc.returned is not None else name)
            return False
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageError(f"cannot move {shown(name)} to {dest.parent}: {exc.strerror or exc}",
                                   True) from exc
            log.error("%s: recorded (id %s) but cannot move it to %s: %s; will retry on restart",
                      shown(name), row["id"], dest.parent, exc.strerror or exc)
            try:
                self._stuck[name] = FileSig.of(os.lstat(path))
            except OSError:
                pass
            return False
        if row["outcome"] == "quarantined":
            self._write_note(row, dest)
        if row["state"] != "done":
            self._done_ids.append(row["id"])
        if recovered:
            self.stats.recovered()
            log.info("%s: already recorded (id %s, %s); finished its move to %s", shown(row["name"]), row["id"],
                     row["label"] or "quarantined", dest.parent)
        return True

    def _write_note(self, row: dict, dest: Path) -> None:
        """NAME.reason.txt beside a quarantined file, created new and renamed into place (never through a
        symlink; a file planted under that name is replaced by the real reason)."""
        note = dest.with_name(dest.name + NOTE_SUFFIX)
        try:
            fileops.write_new(note, f"{row['name']}: {row['reason']}\nrecorded {row['recorded_at']} "
                                    f"(id {row['id']}, sha256 {row['sha256']})\n")
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageError(f"cannot write {note}: {exc.strerror or exc}", True) from exc
            log.warning("cannot write %s: %s", shown(note), exc.strerror or exc)

    # -- start-up recovery ------------------------------------------------------------------------------
    def _source_of(self, row: dict) -> Path:
        """Where a row's file was found. Its key holds the exact name: a name that is not UTF-8 is stored
        escaped in src_path, which does not name the file."""
        exact = self.watch / name_of_key(row["key"])
        return exact if db_text(exact) == row["src_path"] else Path(row["src_path"])

    def reconcile(self) -> None:
        """Finish what an interruption left: rows recorded but not marked done, rows not journaled."""
        done, missing = [], []
        for row in self.store.unfinished():
            src, dest = self._source_of(row), Path(row["dest_path"])
            if os.path.lexists(dest):   # moved before the interruption (a same-content copy left in the
                done.append(row["id"])  # watch folder is removed when the scan finds its key)
                if row["outcome"] == "quarantined":
                    self._write_note(row, dest)
            elif os.path.lexists(src):
                continue            # not moved yet: the scan finds its key and finishes the move
            else:
                log.warning("%s: recorded (id %s) but the file is in neither %s nor %s; marked missing",
                            shown(row["name"]), row["id"], src.parent, dest.parent)
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
    where = f" -> {shown(dest)}" if moved else ""
    name = shown(row["name"])
    if row["outcome"] == "quarantined":
        log.warning("%s: quarantined: %s%s", name, row["reason"], where)
    elif row["defect_class"]:
        log.info("%s: %s (P(defect) %.3f, confidence %.3f%s) %.1f ms%s", name, row["label"],
                 row["stage1_score"], row["confidence"], ", REVIEW" if row["review"] else "",
                 row["latency_ms"], where)
    else:
        log.info("%s: clean (P(defect) %.3f) %.1f ms%s", name, row["stage1_score"], row["latency_ms"], where)
