"""`edge-inspect --watch`: inspect every image dropped into a folder, exactly once, across crashes.

Finding files
    The watch folder is flat (sub-folders are not entered). New files are seen through Linux inotify
    (ctypes on libc, no dependency) with a full rescan every `rescan_seconds` as a safety net; without
    inotify the folder is polled every `poll_seconds`. A file is taken only once it is complete:
    renamed into the folder (write-then-rename: IN_MOVED_TO), or with size and mtime unchanged for
    `settle_seconds`. Hidden and temporary names are ignored (.*, ~*, *.tmp, *.part, *.partial,
    *.crdownload, *.swp). Files present at start-up (the backlog) are processed first.

Per image, in this order (the exactly-once design):
    1. read the bytes once; key = sha256(content) + "/" + file name. If the key is already in the
       database, the image was recorded before a crash: only finish its move (step 4), never re-record.
    2. inspect those same bytes (or decide why it must be quarantined: unsupported type, too large,
       corrupt, truncated, unreadable). If a decode fails while the file is still changing it is put
       back to settle instead of being quarantined.
    3. insert the result (state 'recorded', destination chosen now: processed/, quarantine/ or in place)
       into the open SQLite transaction. Results are group-committed: up to `commit_every` images per
       transaction, held open at most `commit_seconds`, committed at once when nothing else is waiting.
       When COMMIT returns (synchronous=FULL), the group's results are durable.
    4. only then, per image: append the JSONL line (with the row id), move the file (rename; across file
       systems copy + fsync + rename + unlink); quarantined files get NAME.reason.txt beside them.
    5. mark the rows 'done' and 'journaled' (deferred into the next transaction; the JSONL file is fsynced
       before its rows are flagged).
    A kill at any point leaves one of: nothing recorded and the file in the folder (-> processed again);
    recorded but not moved (-> on restart the key is found, the move is finished); moved but not marked
    (-> on restart the row is marked done). An image is never moved before its result is committed, so an
    image in processed/ always has exactly one row. The JSONL file is derived from the database: on start-up
    a partial last line is cut off and rows not flagged journaled are appended unless their id is already
    in the file's tail, so the JSONL also holds each result exactly once.

Stopping
    SIGTERM/SIGINT: the current image is finished and flushed, then exit 0. `--once`: drain the folder
    (including files still settling) and exit. Disk full or any other storage failure: stop taking work,
    leave the remaining images where they are, log why and exit 3.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import stat
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from edge_runtime.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, SUPPORTED_SUFFIXES, ImageError
from edge_runtime.store import Store, StorageError, db_text, is_disk_full, utc_now

log = logging.getLogger("edge_inspect")

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_STORAGE = 0, 1, 2, 3
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".download")
RUNTIMES = ("litert", "tflite-runtime", "tensorflow")


class ConfigError(ValueError):
    """The service configuration is invalid; the message names the key."""


class WatchError(RuntimeError):
    """A folder problem a person must fix (missing, not a folder, no permission)."""


# ---------------------------------------------------------------------------------------------------------
# Configuration: one validated file; command-line flags override it.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ServiceConfig:
    models: str | None = None            # bundle folder
    watch: str | None = None             # the drop folder
    processed: str | None = None         # default: WATCH/processed
    leave_in_place: bool = False         # record only; do not move inspected images
    quarantine: str | None = None        # default: WATCH/quarantine
    db: str | None = None                # default: WATCH/.edge-inspect.sqlite3
    jsonl: str | None = None             # optional JSONL results file
    variant: str | None = None           # default: the bundle's default_variant
    threads: int | None = None           # default: all cores
    runtime: str | None = None           # litert | tflite-runtime | tensorflow (default: first available)
    settle_seconds: float = 1.0          # size+mtime must stay unchanged this long
    poll_seconds: float = 1.0            # polling interval without inotify
    rescan_seconds: float = 30.0         # full rescan interval with inotify (safety net)
    inotify: str = "auto"                # auto | on | off
    summary_seconds: float = 300.0       # periodic summary line (0: never)
    max_file_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_pending: int = 10000             # files tracked at once; more are picked up by later scans
    commit_every: int = 16               # group commit: at most this many results per transaction...
    commit_seconds: float = 0.5          # ...held open at most this long while more files are waiting
    durability: str = "full"             # full: fsync each result (power loss); normal: process kills only
    log_level: str = "INFO"

    def resolved(self) -> "ServiceConfig":
        """Fill defaults that depend on the watch folder; check values."""
        if not self.models:
            raise ConfigError("models: the bundle folder is required (--models or `models:` in the config)")
        if not self.watch:
            raise ConfigError("watch: the folder to watch is required (--watch or `watch:` in the config)")
        if self.leave_in_place and self.processed:
            raise ConfigError("processed and leave_in_place exclude each other")
        watch = Path(self.watch).expanduser()
        out = ServiceConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.watch = str(watch)
        if not self.leave_in_place:
            out.processed = str(Path(self.processed).expanduser() if self.processed else watch / "processed")
        out.quarantine = str(Path(self.quarantine).expanduser() if self.quarantine else watch / "quarantine")
        out.db = str(Path(self.db).expanduser() if self.db else watch / ".edge-inspect.sqlite3")
        for name in ("settle_seconds", "poll_seconds", "rescan_seconds", "summary_seconds", "commit_seconds"):
            if getattr(out, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if out.poll_seconds <= 0 or out.rescan_seconds <= 0:
            raise ConfigError("poll_seconds and rescan_seconds must be > 0")
        for name in ("max_file_bytes", "max_image_pixels", "max_pending", "commit_every"):
            if getattr(out, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        if out.threads is not None and out.threads <= 0:
            raise ConfigError("threads: must be > 0")
        choices = {"inotify": ("auto", "on", "off"), "durability": ("full", "normal"), "runtime": RUNTIMES + (None,),
                   "log_level": ("DEBUG", "INFO", "WARNING", "ERROR")}
        for name, allowed in choices.items():
            if getattr(out, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(out, name)!r} is not one of {[a for a in allowed if a]}")
        for name in ("processed", "quarantine"):
            value = getattr(out, name)
            if value and Path(value).resolve() == watch.resolve():
                raise ConfigError(f"{name}: must be a different folder from the watch folder")
        return out


_TYPES = {"models": str, "watch": str, "processed": str, "leave_in_place": bool, "quarantine": str, "db": str,
          "jsonl": str, "variant": str, "threads": int, "runtime": str, "settle_seconds": float,
          "poll_seconds": float, "rescan_seconds": float, "inotify": str, "summary_seconds": float,
          "max_file_bytes": int, "max_image_pixels": int, "max_pending": int, "commit_every": int,
          "commit_seconds": float, "durability": str,
          "log_level": str}
_PATH_KEYS = ("models", "watch", "processed", "quarantine", "db", "jsonl")


def load_service_config(path: str | os.PathLike | None, overrides: dict | None = None) -> ServiceConfig:
    """Read a service YAML file (unknown keys and wrong types are errors), then apply non-None overrides.
    Relative paths in the file are relative to the file's folder."""
    values: dict = {}
    if path is not None:
        cfg_path = Path(path)
        try:
            raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{cfg_path}: service config file not found") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{cfg_path}: cannot read service config: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{cfg_path}: expected a mapping of settings")
        for key, value in raw.items():
            if key not in _TYPES:
                raise ConfigError(f"{cfg_path}: unknown key {key!r} (known: {', '.join(_TYPES)})")
            if value is None:
                continue
            kind = _TYPES[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is str and key in _PATH_KEYS and not isinstance(value, str):
                raise ConfigError(f"{cfg_path}: {key} must be a path (text), got {value!r}")
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{cfg_path}: {key} must be {kind.__name__}, got {value!r}")
            if key in _PATH_KEYS:
                value = str((cfg_path.parent / Path(value).expanduser()))
            values[key] = value
    for key, value in (overrides or {}).items():
        if key not in _TYPES:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    if values.get("leave_in_place") and overrides and overrides.get("leave_in_place") is None \
            and overrides.get("processed"):
        values["leave_in_place"] = False     # --processed on the command line overrides the file
    if overrides and overrides.get("leave_in_place"):
        values.pop("processed", None)        # --leave-in-place on the command line overrides the file
    return ServiceConfig(**values).resolved()


# ---------------------------------------------------------------------------------------------------------
# Seeing files: inotify through ctypes, or polling.
# ---------------------------------------------------------------------------------------------------------
IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT = struct.Struct("iIII")


class Inotify:
    """Minimal inotify on one folder: read() -> [(mask, name)]."""

    MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

    def __init__(self, folder: Path):
        libc = ctypes.CDLL(None, use_errno=True)      # the C library the interpreter already uses
        if not hasattr(libc, "inotify_init1"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "no inotify in this C library")
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")

    def read(self) -> list[tuple[int, str]]:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            events.append((mask, os.fsdecode(raw)))
            offset += _EVENT.size + length
        return events

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def is_ignored_name(name: str) -> bool:
    """Hidden, editor-backup and in-progress download names are never inspected."""
    low = name.lower()
    return name.startswith((".", "~")) or low.endswith(TEMP_SUFFIXES) or low.endswith("~")


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float            # monotonic time of the last observed change
    renamed_in: bool = False


# ---------------------------------------------------------------------------------------------------------
# JSONL journal, derived from the database.
# ---------------------------------------------------------------------------------------------------------
class Journal:
    TAIL_BYTES = 4 << 20

    def __init__(self, path: Path, durable: bool):
        self.path = path
        self.durable = durable
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "ab")
        self._cut_partial_line()

    def _cut_partial_line(self) -> None:
        """A kill in the middle of a write leaves a line without its newline: drop it (its row is not
        flagged journaled, so it is written again whole)."""
        size = self.fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            start = max(0, size - self.TAIL_BYTES)
            fh.seek(start)
            tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        new_size = start + cut + 1 if cut >= 0 else start
        log.warning("%s: removing a partial last line left by an interrupted write", self.path)
        self.fh.truncate(new_size)
        self.fh.seek(0, os.SEEK_END)
        os.fsync(self.fh.fileno())

    def ids_in_tail(self) -> set[int]:
        ids = set()
        with open(self.path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - self.TAIL_BYTES))
            for line in fh.read().splitlines():
                try:
                    ids.add(int(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
        return ids

    def append(self, obj: dict) -> None:
        """Write one line. It survives a process kill at once (flushed to the OS); it is fsynced by sync()
        before its row is flagged journaled, so a power loss can only lose lines that are re-emitted."""
        self.fh.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self.fh.flush()

    def sync(self) -> None:
        if self.durable:
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


def row_to_json(row: dict) -> dict:
    """The JSONL object for one result (the CLI's --json fields plus the service's own)."""
    review = row.get("review")
    return {"id": row["id"], "path": row["src_path"], "name": row["name"], "label": row.get("label"),
            "stage1_score": row.get("stage1_score"), "defect_class": row.get("defect_class"),
            "confidence": row.get("confidence"), "review": None if review is None else bool(review),
            "latency_ms": row.get("latency_ms"), "outcome": row["outcome"], "reason": row.get("reason"),
            "moved_to": row["dest_path"], "sha256": row.get("sha256"), "variant": row.get("variant"),
            "recorded_at": row["recorded_at"]}


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _check_folder(path: Path, what: str, write: bool, create: bool) -> None:
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise WatchError(f"{what} {path}: cannot create it (permission denied)") from None
        except FileExistsError:
            raise WatchError(f"{what} {path}: exists but is not a folder") from None
        except OSError as exc:
            raise WatchError(f"{what} {path}: cannot create it: {exc.strerror or exc}") from None
    if not path.exists():
        raise WatchError(f"{what} {path}: no such folder")
    if not path.is_dir():
        raise WatchError(f"{what} {path}: not a folder")
    need = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if not os.access(path, need):
        raise WatchError(f"{what} {path}: no permission to {'read and write' if write else 'read'} it "
                         f"(running as uid {os.getuid()})")


# ---------------------------------------------------------------------------------------------------------
# The service.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    inspected: int = 0
    clean: int = 0
    defective: int = 0
    review: int = 0
    quarantined: int = 0
    recovered: int = 0
    latency_ms: float = 0.0

    def line(self) -> str:
        mean = self.latency_ms / self.inspected if self.inspected else 0.0
        return (f"{self.inspected} inspected (clean {self.clean}, defective {self.defective}, review {self.review}), "
                f"{self.quarantined} quarantined, {self.recovered} recovered; mean {mean:.1f} ms/image")


class WatchService:
    def __init__(self, config: ServiceConfig, inspector=None):
        self.cfg = config
        self.watch = Path(config.watch)
        self.processed = Path(config.processed) if config.processed else None
        self.quarantine = Path(config.quarantine)
        _check_folder(self.watch, "watch folder", write=not config.leave_in_place, create=False)
        if self.processed:
            _check_folder(self.processed, "processed folder", write=True, create=True)
        _check_folder(self.quarantine, "quarantine folder", write=True, create=True)
        if inspector is None:
            from edge_runtime.inspector import Inspector
            inspector = Inspector(config.models, variant=config.variant, threads=config.threads,
                                  runtime=config.runtime, max_pixels=config.max_image_pixels,
                                  max_bytes=config.max_file_bytes)
        self.inspector = inspector
        self.variant = inspector.bundle.variant
        durable = config.durability == "full"
        self.store = Store(config.db, durable=durable)
        try:
            self.journal = Journal(Path(config.jsonl), durable) if config.jsonl else None
        except OSError as exc:
            raise StorageError(f"{config.jsonl}: cannot open JSONL file: {exc.strerror or exc}",
                               is_disk_full(exc)) from exc
        self.pending: dict[str, _Candidate] = {}
        self.stuck: dict[str, tuple[int, int]] = {}     # cannot be moved now; retried when it changes
        self.in_place: dict[str, tuple[int, int]] = {}  # leave-in-place: already recorded
        self._batch: list[tuple[dict, Path, bool]] = []   # inserted, not yet committed (not moved)
        self._batch_names: set[str] = set()
        self._batch_started = 0.0
        self._done_ids: list[int] = []          # moved; marked 'done' with the next transaction
        self._unsynced_ids: list[int] = []      # JSONL line written, not yet fsynced
        self._journaled_ids: list[int] = []     # JSONL line durable; flagged with the next transaction
        self.stats = _Stats()
        self._since_summary = _Stats()
        self._unexpected = 0
        self.stop_requested = False
        # A self-pipe wakes the main loop's select() at once on a signal or stop().
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.notifier: Inotify | None = None
        if config.inotify != "off":
            try:
                self.notifier = Inotify(self.watch)
            except (OSError, AttributeError) as exc:
                if config.inotify == "on":
                    raise WatchError(f"inotify requested but unavailable: {exc}") from exc
                log.info("inotify unavailable (%s); polling every %gs", exc, config.poll_seconds)

    def stop(self) -> None:
        """Ask the service to finish the current image and return (any thread)."""
        self.stop_requested = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    # -- signals ----------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            log.info("%s received: finishing the current image, then stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def _install_signals(self):
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
            previous["wakeup"] = signal.set_wakeup_fd(self._wake_w)
        except ValueError:          # not the main thread: no handlers, stop via stop_requested
            pass
        return previous

    def _restore_signals(self, previous) -> None:
        for sig, handler in previous.items():
            if sig == "wakeup":
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(sig, handler)

    # -- main loop --------------------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        previous = self._install_signals()
        try:
            return self._run(once)
        except StorageError as exc:
            what = "disk full" if exc.disk_full else "storage failure"
            log.error("%s: %s. Stopped taking work; the images not yet recorded are still in %s. "
                      "Free space (or fix the storage) and restart: nothing recorded is lost.", what, exc, self.watch)
            return EXIT_STORAGE
        except WatchError as exc:
            log.error("%s", exc)
            return EXIT_SETUP
        finally:
            self._restore_signals(previous)
            self.close()

    def close(self) -> None:
        if self.notifier:
            self.notifier.close()
            self.notifier = None
        if self.journal:
            self.journal.close()
        self.store.close()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def _run(self, once: bool) -> int:
        log.info("watching %s (%s) -> %s; quarantine %s; db %s%s", self.watch,
                 "inotify" if self.notifier else f"polling {self.cfg.poll_seconds:g}s",
                 self.processed or "left in place", self.quarantine, self.cfg.db,
                 f"; jsonl {self.cfg.jsonl}" if self.journal else "")
        log.info("%s", self.inspector.describe())
        self._reconcile()
        self._scan()
        if self.pending:
            log.info("backlog: %d file(s) waiting", len(self.pending))
        rescan_every = self.cfg.rescan_seconds if self.notifier else self.cfg.poll_seconds
        next_rescan = time.monotonic() + rescan_every
        next_summary = time.monotonic() + self.cfg.summary_seconds if self.cfg.summary_seconds else None
        while not self.stop_requested:
            ready = self._ready(time.monotonic())
            for name in ready:
                if self.stop_requested:
                    break
                self._handle(name)
                if self._batch and (len(self._batch) >= self.cfg.commit_every
                                    or time.monotonic() - self._batch_started >= self.cfg.commit_seconds):
                    self._commit()
            now = time.monotonic()
            # Group commit: keep the transaction open while more files are on their way, for at most
            # commit_seconds; commit at once when the folder has nothing else waiting.
            if self._batch and (not self.pending or now - self._batch_started >= self.cfg.commit_seconds):
                self._commit()
            if ready:
                continue            # look for events/ready files again before sleeping
            if not self._batch:
                self._flush()
            if once and not self.pending and not self._batch:
                break
            if next_summary is not None and now >= next_summary:
                self._summary()
                next_summary = now + self.cfg.summary_seconds
            timeout = max(0.0, next_rescan - now)
            if self.pending:
                timeout = min(timeout, max(0.01, min(c.since for c in self.pending.values())
                                           + self.cfg.settle_seconds - now))
            if self._batch:
                timeout = min(timeout, max(0.0, self._batch_started + self.cfg.commit_seconds - now))
            if next_summary is not None:
                timeout = min(timeout, max(0.0, next_summary - now))
            self._wait(min(timeout, 5.0))
            if time.monotonic() >= next_rescan:
                self._scan()
                next_rescan = time.monotonic() + rescan_every
        self._flush()
        log.info("stopped: %s", self.stats.line())
        return EXIT_OK

    def _wait(self, timeout: float) -> None:
        fds = [fd for fd in ((self.notifier.fd if self.notifier else None), self._wake_r) if fd is not None]
        if not fds:
            time.sleep(timeout)
            return
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 512)
            except OSError:
                pass
        if self.notifier and self.notifier.fd in readable:
            for mask, name in self.notifier.read():
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    raise WatchError(f"watch folder {self.watch} was deleted or moved away")
                if mask & IN_Q_OVERFLOW:
                    log.warning("inotify queue overflow; rescanning %s", self.watch)
                    self._scan()
                    continue
                if not name or is_ignored_name(name):
                    continue
                if mask & (IN_DELETE | IN_MOVED_FROM):
                    self.pending.pop(name, None)
                else:
                    self._observe(name, renamed_in=bool(mask & IN_MOVED_TO))

    # -- finding complete files -------------------------------------------------------------------------
    def _scan(self) -> None:
        try:
            names = os.listdir(self.watch)
        except FileNotFoundError:
            raise WatchError(f"watch folder {self.watch} no longer exists") from None
        except PermissionError:
            raise WatchError(f"watch folder {self.watch}: permission denied") from None
        present = set()
        for name in names:
            if is_ignored_name(name):
                continue
            present.add(name)
            self._observe(name)
        for name in list(self.pending):
            if name not in present:
                del self.pending[name]
        for table in (self.stuck, self.in_place):
            for name in [n for n in table if n not in present]:
                del table[name]

    def _observe(self, name: str, renamed_in: bool = False) -> None:
        try:
            st = os.stat(self.watch / name, follow_symlinks=False)
        except FileNotFoundError:
            self.pending.pop(name, None)
            return
        except OSError as exc:
            log.debug("cannot stat %s: %s", name, exc)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        sig = (st.st_size, st.st_mtime_ns)
        if self.stuck.get(name) == sig or self.in_place.get(name) == sig or name in self._batch_names:
            return
        current = self.pending.get(name)
        if current is None:
            if len(self.pending) >= self.cfg.max_pending:
                return          # bounded: found again by a later scan
            self.pending[name] = _Candidate(*sig, since=time.monotonic(), renamed_in=renamed_in)
        elif (current.size, current.mtime_ns) != sig:
            current.size, current.mtime_ns, current.since = st.st_size, st.st_mtime_ns, time.monotonic()
            current.renamed_in = renamed_in
        elif renamed_in:
            current.renamed_in = True

    def _ready(self, now: float) -> list[str]:
        """Names whose size and mtime held still for settle_seconds (re-checked now), oldest first."""
        ready = []
        for name, cand in list(self.pending.items()):
            if not cand.renamed_in and now - cand.since < self.cfg.settle_seconds:
                continue
            before = (cand.size, cand.mtime_ns, cand.since)
            self._observe(name)
            after = self.pending.get(name)
            if after is not None and (after.size, after.mtime_ns, after.since) == before:
                ready.append(name)
        ready.sort(key=lambda n: (self.pending[n].mtime_ns, n))
        return ready

    # -- one image --------------------------------------------------------------------------------------
    def _handle(self, name: str) -> None:
        cand = self.pending.pop(name)
        path = self.watch / name
        size, mtime_ns = cand.size, cand.mtime_ns
        if self.cfg.leave_in_place and self.store.seen_in_place(db_text(path), size, mtime_ns):
            self.in_place[name] = (size, mtime_ns)      # recorded in an earlier run; not read again
            return
        data, digest, reason = None, None, None
        try:
            if size > self.cfg.max_file_bytes:
                digest = _hash_file(path)
                reason = f"file too large ({size} bytes > {self.cfg.max_file_bytes})"
            else:
                with open(path, "rb") as fh:
                    data = fh.read(self.cfg.max_file_bytes + 1)
                if len(data) != size:
                    self._observe(name)         # changed since it was judged complete: settle again
                    return
                digest = hashlib.sha256(data).hexdigest()
        except FileNotFoundError:
            return                      # taken away before we got to it
        except OSError as exc:
            reason = f"cannot read file: {exc.strerror or exc}"
        key = f"{digest}/{name}" if digest else f"unreadable:{size}:{mtime_ns}/{name}"
        row = self.store.get(key)
        if row is not None:
            # Recorded before an interruption (or the very same file dropped again): finish, never re-record.
            self._finish(row, path, recovered=True)
            return
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
                    return              # still being written: it was re-queued to settle again
                reason = str(exc)
            except Exception as exc:    # one bad file must not stop the service...
                self._unexpected += 1
                log.exception("%s: unexpected error while inspecting", name)
                if self._unexpected >= self.MAX_UNEXPECTED_IN_A_ROW:   # ...but a broken runtime must
                    raise WatchError(f"{self._unexpected} images in a row failed unexpectedly (last: "
                                     f"{type(exc).__name__}: {exc}); stopping, the rest stay in {self.watch}")
                reason = f"could not be inspected: {type(exc).__name__}: {exc}"
        self._record(name, path, size, mtime_ns, digest, key, result, reason)

    MAX_UNEXPECTED_IN_A_ROW = 10

    def _changed(self, path: Path, size: int, mtime_ns: int) -> bool:
        """Re-queue the file if it changed since it was judged complete."""
        try:
            st = os.stat(path)
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            log.info("%s is still changing; waiting for it to settle", path.name)
            self._observe(path.name)
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
               "variant": self.variant, "state": "done" if in_place else "recorded",
               "journaled": 0 if self.journal else 1, "recorded_at": utc_now()}
        if result is not None:
            row.update(label=result.label, stage1_score=round(result.stage1_score, 6),
                       defect_class=result.defect_class, confidence=round(result.confidence, 6),
                       review=int(result.review), latency_ms=round(result.latency_ms, 3))
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
                self.in_place[path.name] = (row["size"], row["mtime_ns"])
            else:
                self._finish(row, path)
            self._count(row, Path(row["dest_path"]))

    JOURNAL_SYNC_EVERY = 32     # one JSONL fsync per this many results (and whenever the folder is idle)

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
                self.in_place[path.name] = (st.st_size, st.st_mtime_ns)
            except OSError:
                pass
        else:
            try:
                if dest.exists() and path.exists():
                    # Copied across file systems before an interruption, or the same file dropped again.
                    if _same_content(path, dest):
                        path.unlink()
                    else:
                        raise FileExistsError(errno.EEXIST, f"{dest} exists with other content")
                elif path.exists():
                    _move(path, dest)
            except OSError as exc:
                if is_disk_full(exc):
                    raise StorageError(f"cannot move {path.name} to {dest.parent}: {exc.strerror or exc}",
                                       True) from exc
                log.error("%s: recorded (id %s) but cannot move it to %s: %s; will retry on restart",
                          path.name, row["id"], dest.parent, exc.strerror or exc)
                try:
                    st = os.stat(path)
                    self.stuck[path.name] = (st.st_size, st.st_mtime_ns)
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
            self.stats.recovered += 1
            log.info("%s: already recorded (id %s, %s); finished its move to %s", row["name"], row["id"],
                     row["label"] or "quarantined", dest.parent)

    def _count(self, row: dict, dest: Path) -> None:
        for s in (self.stats, self._since_summary):
            if row["outcome"] == "quarantined":
                s.quarantined += 1
            else:
                s.inspected += 1
                s.latency_ms += row["latency_ms"]
                if row["defect_class"]:
                    s.defective += 1
                    s.review += bool(row["review"])
                else:
                    s.clean += 1
        where = "" if self.processed is None and row["outcome"] != "quarantined" else f" -> {dest}"
        if row["outcome"] == "quarantined":
            log.warning("%s: quarantined: %s%s", row["name"], row["reason"], where)
        elif row["defect_class"]:
            log.info("%s: %s (P(defect) %.3f, confidence %.3f%s) %.1f ms%s", row["name"], row["label"],
                     row["stage1_score"], row["confidence"], ", REVIEW" if row["review"] else "",
                     row["latency_ms"], where)
        else:
            log.info("%s: clean (P(defect) %.3f) %.1f ms%s", row["name"], row["stage1_score"], row["latency_ms"],
                     where)

    def _flush(self) -> None:
        if self._batch:
            self._commit()
        if self.journal:
            self._sync_journal()
        if self._done_ids or self._journaled_ids:
            self.store.update(self._done_ids, self._journaled_ids)
            self._done_ids, self._journaled_ids = [], []

    def _summary(self) -> None:
        s = self._since_summary
        if s.inspected or s.quarantined or s.recovered:
            rss = _rss_mb()
            log.info("summary (last %gs): %s; %d waiting%s", self.cfg.summary_seconds, s.line(), len(self.pending),
                     f"; rss {rss:.0f} MB" if rss else "")
        self._since_summary = _Stats()

    # -- start-up recovery ------------------------------------------------------------------------------
    def _reconcile(self) -> None:
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


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _same_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and _hash_file(a) == _hash_file(b)


def _move(src: Path, dest: Path) -> None:
    """Rename; across file systems copy to a hidden temporary, fsync, rename, then unlink the source."""
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        os.rename(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    src.unlink()
