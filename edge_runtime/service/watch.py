"""`edge-inspect --watch`: the folder-watching loop. It finds complete files and hands them to the exactly-once
recorder (edge_runtime/service/recorder.py); settings in edge_runtime/config/service_config.py.

Finding files
    The watch folder is flat (sub-folders are not entered). New files are seen through Linux inotify
    (edge_runtime/service/inotify.py) with a full rescan every `rescan_seconds` as a safety net; without inotify the
    folder is polled every `poll_seconds`. A file is taken only once it is complete: renamed into the folder
    (write-then-rename: IN_MOVED_TO), or unchanged (inode, size, mtime, ctime) for `settle_seconds`. Hidden
    and temporary names are ignored (.*, ~*, *.tmp, *.part, *.partial, *.crdownload, *.swp), and so are the
    service's own files when they live in the folder (database, its -wal/-shm, lock, JSONL), folders and
    symlinks. FIFOs, sockets and devices are quarantined without being opened. Files present at start-up
    (the backlog) are processed first; at most `max_pending` are tracked at once, and the folder is scanned
    again as soon as those are done.

Files still being written
    A file that fails to decode before its writer is surely done (it was not renamed in, no close-after-write
    was seen, and it has not been left alone for `incomplete_seconds`) is not quarantined: it waits, and is
    tried again when it changes or once one of those holds. A writer that pauses longer than settle_seconds
    therefore loses nothing.

Bundles (edge_runtime/service/active.py, shadow.py, rollout.py)
    SIGHUP, or the `models` symlink pointed elsewhere (seen on the loop's next tick, within a second or five),
    loads that bundle (signature and sha256 checked) and swaps it in between two images: the image in hand
    finishes on the old bundle, every later result records the new bundle id. A bundle that does not load leaves
    the old one running and says why (log, /healthz, the MQTT status). `shadow:` (or a rollout) runs a candidate
    beside the current bundle on a fraction of the images; `bundles_dir:` takes rollouts over MQTT. The loop
    makes these changes between images; what /healthz and the MQTT messages say is edge_runtime/service/status.py.

Stopping
    SIGTERM/SIGINT: the current image is finished and flushed, then exit 0. `--once`: drain the folder
    (including files still settling or still being written) and exit. Disk full or any other storage failure:
    stop taking work, leave the remaining images where they are, log why and exit 3. The watch folder or the
    database deleted or replaced while running, or a second instance on the same folder or database: exit 2
    with a message saying which.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.config.service_config import ServiceConfig, own_files
from edge_runtime.db.journal import Journal
from edge_runtime.db.store import StorageError, Store, is_disk_full
from edge_runtime.exits import EXIT_OK, EXIT_SETUP, EXIT_STORAGE, WatchError
from edge_runtime.inputs import is_ignored_name
from edge_runtime.names import shown
from edge_runtime.service.active import ActiveBundles, load_inspector
from edge_runtime.service.fileops import FileSig, check_folder
from edge_runtime.service.inotify import (
    IN_CLOSE_WRITE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
)
from edge_runtime.service.lock import ServiceLock
from edge_runtime.service.recorder import Handled, Recorder
from edge_runtime.service.sd_notify import SdNotify
from edge_runtime.service.stats import ServiceStats, rss_mb
from edge_runtime.service.status import ServiceStatus

log = logging.getLogger("edge_inspect")


@contextmanager
def _fleet_errors(cfg: ServiceConfig):
    """A fleet part that cannot start is a setup error that says why."""
    try:
        yield
    except RuntimeError as exc:         # MissingExtra: the package to install is named
        raise WatchError(str(exc)) from exc
    except OSError as exc:
        raise WatchError(f"http: cannot listen on {cfg.http}: {exc.strerror or exc}") from exc


@dataclass
class _Candidate:
    sig: FileSig
    since: float            # monotonic time of the last observed change
    renamed_in: bool = False
    closed: bool = False    # its writer closed it after the last change (IN_CLOSE_WRITE)
    incomplete: bool = False    # failed to decode while it may still be written: waits for a change or the end


class WatchService:
    def __init__(self, config: ServiceConfig, inspector=None):
        self.cfg = config
        self.watch = Path(config.watch)
        check_folder(self.watch, "watch folder", write=not config.leave_in_place, create=False)
        if config.processed:
            check_folder(Path(config.processed), "processed folder", write=True, create=True)
        check_folder(Path(config.quarantine), "quarantine folder", write=True, create=True)
        # One service per folder and per database: a second instance is refused here, naming the first.
        self.lock = ServiceLock(self.watch, Path(config.db))
        try:
            self._open(config, inspector)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, config: ServiceConfig, inspector) -> None:
        if inspector is None:
            inspector = load_inspector(config.models, config)
        self._reload_requested = False
        self.rollout = None
        self.publisher = self.http = None
        durable = config.durability == "full"
        self.store = Store(config.db, durable=durable)
        try:
            self.journal = Journal(Path(config.jsonl), durable) if config.jsonl else None
        except OSError as exc:
            raise StorageError(f"{config.jsonl}: cannot open JSONL file: {exc.strerror or exc}",
                               is_disk_full(exc)) from exc
        self.stats = ServiceStats()
        self.sd = SdNotify()
        self.pending: dict[str, _Candidate] = {}
        with _fleet_errors(config):
            metrics = self._metrics() if config.http else None
        self.recorder = Recorder(config, inspector, self.store, self.journal, self.stats)
        self.bundles = ActiveBundles(config, self.store, self.recorder, inspector, metrics)
        if config.bundles_dir:
            from edge_runtime.service.rollout import RolloutAgent
            self.rollout = RolloutAgent(self.bundles, config, wake=self.wake)
        self.status = ServiceStatus(config, self.bundles, self.stats, backlog=lambda: len(self.pending),
                                    rollout=self.rollout)
        with _fleet_errors(config):
            self._fleet_setup(metrics)
        if config.shadow:
            self.bundles.start_shadow(config.shadow, config.shadow_fraction, source="config")
        self._capped = False        # a file was left out because max_pending were tracked: scan again
        # The service's own files, where they sit in the watch folder, are never inputs.
        self._own = {p.name for p in own_files(config) if p.parent.resolve() == self.watch.resolve()}
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

    def _metrics(self):
        """The HTTP API's Prometheus metrics (edge_runtime/fleet/metrics.py)."""
        from edge_runtime.fleet.metrics import Metrics
        metrics = Metrics(backlog=lambda: len(self.pending),
                          unpublished=lambda: self.publisher.unpublished if self.publisher else 0,
                          rss_mb=rss_mb, bundles=lambda: self.status.bundle_state())
        self.stats.listeners.append(metrics.count)
        return metrics

    def _fleet_setup(self, metrics) -> None:
        """MQTT publisher and HTTP API when configured (edge_runtime/fleet/publisher.py, http_api.py), each handed
        what it reports: the service's status (status.py) and the bundles (active.py)."""
        cfg, status = self.cfg, self.status
        if cfg.mqtt:
            from edge_runtime.fleet.publisher import Publisher
            self.publisher = Publisher(cfg, self.store, status.stats_message, self.wake, status_fn=status.status,
                                       on_rollout=self.rollout.receive if self.rollout else None)
            status.publisher = self.publisher
        if cfg.http:
            from edge_runtime.fleet.http_api import HttpApi
            bundles = self.bundles
            self.http = HttpApi(cfg, metrics, health=status.health, current_bundle=lambda: bundles.bundle)
            bundles.swap_listeners.append(self.http.bundle_changed)

    def _bundle_tick(self) -> None:
        """Between images, with no group open: a requested reload (SIGHUP, the symlink re-pointed), the rollout
        agent, the shadow's comparison; the status is published when anything changed."""
        changed = False
        if self._reload_requested or self.bundles.link_repointed():
            self._reload_requested = False
            self.bundles.reload()
            changed = True
        if self.rollout is not None:
            try:
                changed |= self.rollout.tick()
            except OSError as exc:          # its state file or a bundle folder cannot be written (disk full)
                error = f"rollout: {exc}"
                if self.bundles.report_error(str(self.rollout.dir), error):     # said once, not at every tick
                    log.error("%s; the current bundle goes on inspecting, the rollout resumes at the next start",
                              error)
                    changed = True
        self.bundles.refresh_shadow()
        if changed and self.publisher:
            self.publisher.publish_status()

    def wake(self) -> None:
        """Wake the main loop (any thread), e.g. when the broker acknowledged results."""
        try:
            os.write(self._wake_w, b"\0")
        except (OSError, TypeError):
            pass

    def stop(self) -> None:
        """Ask the service to finish the current image and return (any thread)."""
        self.stop_requested = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    # -- signals ----------------------------------------------------------------------------------------
    def _on_hup(self, signum, frame) -> None:
        self._reload_requested = True           # the loop loads the bundle between two images

    def _on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            log.info("%s received: finishing the current image, then stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def _install_signals(self):
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
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
        self.sd.stopping()
        if self.http:
            self.http.close()
            self.http = None
        if self.publisher:
            try:
                self.publisher.close()
            except Exception as exc:    # e.g. the database failed: what is unmarked is resent at the next start
                log.warning("mqtt: %s", exc)
            self.publisher = None
        self.sd.close()
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
        self.lock.release()

    def _skip(self, name: str) -> bool:
        return is_ignored_name(name) or name in self._own

    def _run(self, once: bool) -> int:
        cfg, recorder = self.cfg, self.recorder
        log.info("watching %s (%s) -> %s; quarantine %s; db %s%s", self.watch,
                 "inotify" if self.notifier else f"polling {cfg.poll_seconds:g}s",
                 cfg.processed or "left in place", cfg.quarantine, cfg.db,
                 f"; jsonl {cfg.jsonl}" if self.journal else "")
        log.info("%s", self.bundles.inspector.describe())
        recorder.reconcile()
        if self.rollout is not None:
            self.rollout.start()            # what a restart interrupted: a download, a shadow, a promotion
        self._scan()
        if self.pending:
            log.info("backlog: %d file(s) waiting", len(self.pending))
        for part in (self.publisher, self.http):
            if part:
                part.start()
        self.sd.ready(f"watching {self.watch}")
        rescan_every = cfg.rescan_seconds if self.notifier else cfg.poll_seconds
        next_rescan = time.monotonic() + rescan_every
        next_summary = time.monotonic() + cfg.summary_seconds if cfg.summary_seconds else None
        while not self.stop_requested:
            now = time.monotonic()
            ready = self._ready(now)
            for name in ready:
                if self.stop_requested or self._reload_requested:
                    break                   # a reload: the images after it go to the new bundle
                cand = self.pending.pop(name)
                outcome = recorder.handle(name, cand.sig, final=self._final(cand, time.monotonic()))
                if outcome is Handled.RESETTLE:
                    self._observe(name)         # changed since it was judged complete: settle again
                elif outcome is Handled.RETRY:
                    cand.incomplete, cand.closed = True, False     # waits for a change or for the end
                    self.pending[name] = cand
                recorder.commit_if_due(waiting=True)
                self._requeue()
                self._fleet_tick()              # a long backlog still pings the watchdog and publishes
            # Group commit: keep the transaction open while more files are on their way, for at most
            # commit_seconds; commit at once when the folder has nothing else waiting.
            recorder.commit_if_due(waiting=bool(self.pending))
            self._requeue()
            self._fleet_tick()
            if not recorder.has_open_group or self._reload_requested:
                self._bundle_tick()
            if ready:
                continue            # look for events/ready files again before sleeping
            recorder.idle()
            if self._capped and not self.pending:
                self._scan()        # files left out while max_pending were tracked: take them now
                continue
            if once and not self.pending and not recorder.has_open_group:
                break
            now = time.monotonic()
            if next_summary is not None and now >= next_summary:
                self._summary()
                next_summary = now + cfg.summary_seconds
            timeout = max(0.0, next_rescan - now)
            if self.pending:
                timeout = min(timeout, max(0.01, min(self._due(c, now) for c in self.pending.values()) - now))
            deadline = recorder.commit_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            if next_summary is not None:
                timeout = min(timeout, max(0.0, next_summary - now))
            self._wait(min(timeout, 1.0 if self.publisher else 5.0, self.sd.interval or 5.0))
            if time.monotonic() >= next_rescan:
                self._scan()
                next_rescan = time.monotonic() + rescan_every
        recorder.flush()
        if recorder.unreadable:
            log.warning("%d file(s) left in %s because they cannot be read: %s", len(recorder.unreadable),
                        self.watch, ", ".join(shown(n) for n in recorder.unreadable[:10]))
        self._fleet_tick()
        log.info("stopped: %s", self.stats.total.line())
        return EXIT_OK

    def _requeue(self) -> None:
        for name in self.recorder.take_requeued():
            self._observe(name)

    def _fleet_tick(self) -> None:
        """After each image: the systemd watchdog ping (when due); between group commits: MQTT
        acknowledgements and sends."""
        self.sd.watchdog()
        if self.publisher and not self.recorder.has_open_group:
            self.publisher.pump()

    def _summary(self) -> None:
        recent = self.stats.take_recent()
        if recent:
            rss = rss_mb()
            log.info("summary (last %gs): %s; %d waiting%s", self.cfg.summary_seconds, recent.line(),
                     len(self.pending), f"; rss {rss:.0f} MB" if rss else "")

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
                if not name or self._skip(name):
                    continue
                if mask & (IN_DELETE | IN_MOVED_FROM):
                    self.pending.pop(name, None)
                else:
                    self._observe(name, renamed_in=bool(mask & IN_MOVED_TO), closed=bool(mask & IN_CLOSE_WRITE))

    # -- finding complete files -------------------------------------------------------------------------
    def _scan(self) -> None:
        self.recorder.check_places()        # the folder (and the database) still the ones we started with
        self._capped = False
        try:
            names = os.listdir(self.watch)
        except FileNotFoundError:
            raise WatchError(f"watch folder {self.watch} no longer exists") from None
        except PermissionError:
            raise WatchError(f"watch folder {self.watch}: permission denied") from None
        present = set()
        for name in names:
            if self._skip(name):
                continue
            present.add(name)
            self._observe(name)
        for name in list(self.pending):
            if name not in present:
                del self.pending[name]
        self.recorder.forget_absent(present)

    def _observe(self, name: str, renamed_in: bool = False, closed: bool = False) -> None:
        try:
            st = os.stat(self.watch / name, follow_symlinks=False)
        except FileNotFoundError:
            self.pending.pop(name, None)
            return
        except OSError as exc:
            log.debug("cannot stat %s: %s", shown(name), exc)
            return
        # Folders are not entered and symlinks never followed; regular files and FIFOs, sockets and devices
        # (quarantined as such) are candidates.
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            self.pending.pop(name, None)
            return
        sig = FileSig.of(st)
        if self.recorder.holds(name, sig):
            return
        current = self.pending.get(name)
        if current is None:
            if len(self.pending) >= self.cfg.max_pending:
                self._capped = True     # bounded: taken by the scan that follows once these are done
                return
            self.pending[name] = _Candidate(sig, since=time.monotonic(), renamed_in=renamed_in, closed=closed)
        elif current.sig != sig:
            current.sig, current.since = sig, time.monotonic()
            current.renamed_in, current.closed, current.incomplete = renamed_in, closed, False
        else:
            current.renamed_in |= renamed_in
            current.closed |= closed

    def _quiet(self, cand: _Candidate, now: float) -> float:
        """How long the file has been left alone: since its last observed change, or by its mtime (a file
        found at start-up may have been finished long ago)."""
        return max(now - cand.since, time.time() - cand.sig.mtime_ns / 1e9)

    def _final(self, cand: _Candidate, now: float) -> bool:
        """Its writer is surely done: renamed in, closed after the last write, or left alone long enough."""
        return cand.renamed_in or cand.closed or self._quiet(cand, now) >= self.cfg.incomplete_seconds

    def _due(self, cand: _Candidate, now: float) -> float:
        """When (monotonic) the candidate is next worth a look."""
        if not cand.incomplete:
            return now if cand.renamed_in else cand.since + self.cfg.settle_seconds
        if cand.closed:
            return now
        # Incomplete: look for growth every settle period, and take it for good once left alone long enough.
        return min(now + max(self.cfg.settle_seconds, 0.1),
                   now + max(0.0, self.cfg.incomplete_seconds - self._quiet(cand, now)))

    def _ready(self, now: float) -> list[str]:
        """Names that held still for settle_seconds (re-checked now), oldest first. A file that failed to
        decode while it may still be written is ready again when it changed and settled, or once final."""
        ready = []
        for name, cand in list(self.pending.items()):
            if cand.incomplete:
                before = (cand.sig, cand.since)
                self._observe(name)             # grown since? then it settles again like a new file
                after = self.pending.get(name)
                if after is not None and (after.sig, after.since) == before and self._final(after, now):
                    ready.append(name)
                continue
            if not cand.renamed_in and now - cand.since < self.cfg.settle_seconds:
                continue
            before = (cand.sig, cand.since)
            self._observe(name)
            after = self.pending.get(name)
            if after is not None and (after.sig, after.since) == before:
                ready.append(name)
        ready.sort(key=lambda n: (self.pending[n].sig.mtime_ns, n))
        return ready
