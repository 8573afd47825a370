"""The watch service's Prometheus metrics (prometheus-client, the optional `fleet` extra), served by http_api.py.

    sem_inspect_images_total{label}            results by final label (clean or the defect class)
    sem_inspect_quarantined_total              unusable files quarantined
    sem_inspect_review_total                   results flagged for operator review
    sem_inspect_stage_latency_seconds{stage}   histogram: preprocess, stage1, stage2
    sem_inspect_backlog                        files waiting in the watch folder
    sem_inspect_unpublished                    results not yet acknowledged by the MQTT broker (0 without MQTT)
    sem_inspect_rss_bytes                      the service's resident memory
"""
from __future__ import annotations

from edge_runtime.fleet.publisher import need

STAGES = ("preprocess", "stage1", "stage2")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, backlog=lambda: 0, unpublished=lambda: 0, rss_mb=lambda: None):
        pc = need("prometheus_client", "http", "prometheus-client")
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        self.images = pc.Counter("sem_inspect_images", "Results by final label", ["label"], registry=self.registry)
        self.quarantined = pc.Counter("sem_inspect_quarantined", "Unusable files quarantined",
                                      registry=self.registry)
        self.review = pc.Counter("sem_inspect_review", "Results flagged for operator review", registry=self.registry)
        self.latency = pc.Histogram("sem_inspect_stage_latency_seconds", "Inference time per stage", ["stage"],
                                    buckets=BUCKETS, registry=self.registry)
        pc.Gauge("sem_inspect_backlog", "Files waiting in the watch folder",
                 registry=self.registry).set_function(backlog)
        pc.Gauge("sem_inspect_unpublished", "Results not yet acknowledged by the MQTT broker",
                 registry=self.registry).set_function(unpublished)
        pc.Gauge("sem_inspect_rss_bytes", "Resident memory of the service",
                 registry=self.registry).set_function(lambda: (rss_mb() or 0.0) * 2**20)

    def count(self, row: dict) -> None:
        """One committed result row (a ServiceStats listener)."""
        if row["outcome"] == "quarantined":
            self.quarantined.inc()
            return
        self.images.labels(row["label"]).inc()
        if row.get("review"):
            self.review.inc()

    def timed(self, result) -> None:
        """One InspectionResult's stage times."""
        for stage in STAGES:
            ms = getattr(result, f"{stage}_ms")
            if ms is not None:
                self.latency.labels(stage).observe(ms / 1e3)

    def exposition(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST


class TimedInspector:
    """An Inspector whose every inspect() also feeds the stage-latency histogram."""

    def __init__(self, inspector, metrics: Metrics):
        self._inspector, self._metrics = inspector, metrics

    def inspect(self, *args, **kwargs):
        result = self._inspector.inspect(*args, **kwargs)
        self._metrics.timed(result)
        return result

    def __getattr__(self, name):
        return getattr(self._inspector, name)
