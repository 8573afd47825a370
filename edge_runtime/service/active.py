"""The bundles the watch service inspects with: the current one and the optional candidate beside it (a shadow run,
edge_runtime/service/shadow.py), and every change of them: a swap (SIGHUP or the `models` link re-pointed), a
shadow started or stopped, a promotion, a rollback. The watch loop, the rollout agent (rollout.py) and what
reports the service's state (status.py) are handed this one object.

A change is made in the service's thread between two images: the recorder's open group is flushed first, so the
image in hand finishes on the old bundle and every later result records the new bundle id. A bundle that does not
load leaves the current one running; the reason is returned, logged, and kept for /healthz and the MQTT status.

Threads: the HTTP API, the metrics and paho's thread read `inspector`, `shadow` and snapshot() while the service's
thread changes them. Each change replaces a reference whole (never a field of a shared object), so a reader sees
the old value or the new one and no lock is needed.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

from edge_runtime.config.service_config import ServiceConfig, inspector_args
from edge_runtime.db.store import Store
from edge_runtime.service.bundles import repoint
from edge_runtime.service.shadow import Shadow

log = logging.getLogger("edge_inspect")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def load_inspector(path, cfg: ServiceConfig):
    from edge_runtime.inspector import Inspector
    return Inspector(path, **inspector_args(cfg))


def summary_line(s: dict) -> str:
    if not s["images"]:
        return "no image shadowed"
    return (f"{s['images']} images, agreement {s['agreement']:.3f}, Stage-1 {s['stage1_agreement']:.3f}, "
            f"errors {s['errors']}")


class ActiveBundles:
    """recorder: what inspects the images (flush(), set_inspector(), its `shadow`); metrics: the HTTP API's
    Metrics or None (the recorder's inspector is then timed, and so is the shadow)."""

    RELOAD_WHY = "reloaded (SIGHUP or the models link re-pointed)"

    def __init__(self, cfg: ServiceConfig, store: Store, recorder, inspector, metrics=None):
        self.cfg, self.store, self.recorder, self.metrics = cfg, store, recorder, metrics
        self.inspector = inspector
        self.shadow: Shadow | None = None
        self.error: dict | None = None          # the last bundle that failed to load, and why
        self.last_swap: dict | None = None
        self.swap_listeners = []                # called after each swap (the HTTP API drops its own interpreter)
        self._models_target = os.path.realpath(cfg.models) if cfg.models else None
        store.register_bundle(inspector.bundle)      # model provenance: results carry its id
        recorder.set_inspector(self._timed(inspector))

    @property
    def bundle(self):
        """The current bundle (any thread)."""
        return self.inspector.bundle

    def _timed(self, inspector):
        if self.metrics is None:
            return inspector
        from edge_runtime.fleet.metrics import TimedInspector
        return TimedInspector(inspector, self.metrics)

    # -- swaps --------------------------------------------------------------------------------------------
    def link_repointed(self) -> bool:
        """The `models` link points elsewhere than the bundle last loaded (or tried) from it."""
        if self._models_target is None:
            return False
        try:
            return os.path.realpath(self.cfg.models) != self._models_target
        except OSError:
            return False

    def reload(self) -> str | None:
        """Load what `models` points to now and swap it in (SIGHUP, the link re-pointed)."""
        return self.swap(self.cfg.models, self.RELOAD_WHY)

    def swap(self, path, why: str) -> str | None:
        """Load the bundle at `path` (signature, sha256, interpreters) and swap it in; on failure the current one
        stays and the reason is returned."""
        new = self._load(path)
        if isinstance(new, str):
            return new
        self._install(new, why)
        return None

    def roll_back(self, path, why: str) -> str | None:
        """Swap back to the bundle at `path`; `models` is re-pointed to it only once it loaded."""
        new = self._load(path)
        if isinstance(new, str):
            return new
        repoint(Path(self.cfg.models), Path(os.path.realpath(path)))
        self._install(new, why)
        return None

    def promote(self, path, why: str) -> str | None:
        """The candidate becomes current: the shadow's own inspector when it runs that bundle (no second load),
        else the bundle at `path` loaded now."""
        shadow = self.shadow
        if shadow is not None and str(shadow.inspector.bundle.root) == str(Path(path).resolve()):
            self.stop_shadow()
            self._install(shadow.inspector, why)
            return None
        return self.swap(path, why)

    def _load(self, path):
        """The inspector of the bundle at `path`, or why it does not load (str; recorded in `error`)."""
        target = os.path.realpath(path)
        try:
            return load_inspector(path, self.cfg)
        except Exception as exc:            # BundleError, NoInterpreter, an unreadable folder...
            self._models_target = os.path.realpath(self.cfg.models)     # not retried until it changes again
            self.error = {"at": _now(), "path": target, "error": str(exc)}
            log.error("bundle %s not loaded (%s); still inspecting with %s", target, exc, self.bundle.bundle_id[:16])
            return str(exc)

    def _install(self, inspector, why: str) -> None:
        """Make `inspector` the current bundle (between two images, no group open)."""
        self.recorder.flush()
        old = self.bundle
        self.store.register_bundle(inspector.bundle)
        self.inspector = inspector
        self.recorder.set_inspector(self._timed(inspector))
        for listener in self.swap_listeners:
            listener()
        self._models_target = os.path.realpath(self.cfg.models)
        self.error = None
        self.last_swap = {"at": _now(), "what": "swapped", "bundle_id": inspector.bundle.bundle_id,
                          "why": f"{why}: from {old.bundle_id[:16]}", "rollout": None}
        log.info("bundle %s (%s) now inspects every new image (was %s; %s)", inspector.bundle.bundle_id[:16],
                 inspector.bundle.root, old.bundle_id[:16], why)

    def report_error(self, path: str, error: str) -> bool:
        """Keep `error` (about `path`) for /healthz and the status; False when it is the one already kept."""
        if (self.error or {}).get("error") == error:
            return False
        self.error = {"at": _now(), "path": path, "error": error}
        return True

    # -- the shadow ---------------------------------------------------------------------------------------
    def start_shadow(self, path, fraction: float, since: str | None = None, source: str = "config") -> None:
        """Run the bundle at `path` beside the current one (BundleError etc. when it does not load)."""
        self.recorder.flush()
        shadow = Shadow(load_inspector(path, self.cfg), self.store, fraction, since=since, source=source)
        if self.metrics:
            shadow.listeners.append(self.metrics.shadow_timed)
        self.shadow = self.recorder.shadow = shadow
        log.info("shadow: candidate %s (%s) beside %s on %s of the images (%s)", shadow.bundle_id[:16],
                 shadow.inspector.bundle.root, self.bundle.bundle_id[:16],
                 "all" if fraction >= 1 else f"{fraction:.0%}", source)

    def stop_shadow(self) -> None:
        self.recorder.flush()
        if self.shadow is not None:
            log.info("shadow: candidate %s stopped (%s)", self.shadow.bundle_id[:16],
                     summary_line(self.shadow.refresh(force=True)))
        self.shadow = self.recorder.shadow = None

    def refresh_shadow(self) -> None:
        """Recompute the shadow's comparison when due (service thread, no group open)."""
        if self.shadow is not None:
            self.shadow.refresh()

    # -- what is reported ---------------------------------------------------------------------------------
    def snapshot(self, rollout: dict | None = None) -> dict:
        """The bundles as the status topic, /healthz and /metrics report them (any thread): current, candidate and
        its shadow comparison, previous, phase, last change, the last bundle that failed to load. rollout: the
        rollout agent's report (RolloutAgent.report), when the board takes rollouts."""
        b, shadow = self.bundle, self.shadow
        out = {"current": b.bundle_id, "path": str(b.root), "signed_by": b.signed_by,
               "candidate": None if shadow is None else shadow.bundle_id,
               "shadow": None if shadow is None else shadow.snapshot, "previous": [], "phase": None,
               "last_change": self.last_swap, "error": self.error}
        if rollout is not None:
            change = rollout["last_change"]
            if change and (not self.last_swap or change["at"] >= self.last_swap["at"]):
                out["last_change"] = change
            out.update(previous=rollout["previous"], phase=rollout["candidate"] and rollout["candidate"]["phase"],
                       rollout=rollout["candidate"])
            if rollout["candidate"] and out["candidate"] is None:
                out["candidate"] = rollout["candidate"]["bundle_id"]
        return out
