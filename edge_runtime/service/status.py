"""What the watch service says about itself: GET /healthz (edge_runtime/fleet/http_api.py), the MQTT status and
stats messages (edge_runtime/fleet/publisher.py) and the bundle gauges of /metrics. Each is a callable handed to
the part that serves it; they run in that part's thread and only read (the bundles: active.py; the counters:
stats.py; the backlog: a callable of the watch loop).
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Callable

from edge_runtime.config.service_config import ServiceConfig
from edge_runtime.service.active import ActiveBundles
from edge_runtime.service.stats import ServiceStats, rss_mb


class ServiceStatus:
    """rollout: the RolloutAgent or None; publisher: the MQTT publisher once it exists (its connection and backlog
    are part of /healthz), else None."""

    def __init__(self, cfg: ServiceConfig, bundles: ActiveBundles, stats: ServiceStats, backlog: Callable[[], int],
                 rollout=None):
        self.cfg, self.bundles, self.stats, self.backlog, self.rollout = cfg, bundles, stats, backlog, rollout
        self.watch = Path(cfg.watch)
        self.publisher = None

    def bundle_state(self) -> dict:
        return self.bundles.snapshot(None if self.rollout is None else self.rollout.report())

    def health(self) -> dict:
        """GET /healthz."""
        writable = os.access(self.watch, os.W_OK | os.X_OK) or self.cfg.leave_in_place
        last = self.stats.last_at
        out = {"ok": writable, "model_loaded": True, "bundle_id": self.bundles.bundle.bundle_id,
               "folder_writable": writable, "backlog": self.backlog(),
               "last_image_at": None if last is None else
               _dt.datetime.fromtimestamp(last, _dt.timezone.utc).isoformat(timespec="milliseconds"),
               "bundle": self.bundle_state()}
        publisher = self.publisher
        if publisher:
            out.update(mqtt_connected=publisher.connected, unpublished=publisher.unpublished)
        return out

    def status(self) -> dict:
        """The retained MQTT status message (less "board" and "at", which the publisher adds)."""
        return {"status": "online", "bundle": self.bundle_state()}

    def stats_message(self) -> dict:
        """The MQTT stats message (less "board" and "at")."""
        rss = rss_mb()
        shadow = self.bundles.shadow
        return {**self.stats.as_dict(), "backlog": self.backlog(), "rss_mb": None if rss is None else round(rss, 1),
                "bundle_id": self.bundles.bundle.bundle_id, "shadow": None if shadow is None else shadow.snapshot}
