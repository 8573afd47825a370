"""The watch service's Prometheus metrics (prometheus-client, the optional `fleet` extra), served by http_api.py.

    sem_inspect_images_total{label}            results by final label (clean or the defect class)
    sem_inspect_quarantined_total              unusable files quarantined
    sem_inspect_review_total                   results flagged for operator review
    sem_inspect_stage_latency_seconds{stage}   histogram: preprocess, stage1, stage2
    sem_inspect_backlog                        files waiting in the watch folder
    sem_inspect_unpublished                    results not yet acknowledged by the MQTT broker (0 without MQTT)
    sem_inspect_rss_bytes                      the service's resident memory
    sem_inspect_bundle_info{bundle_id,role}    1 per bundle: role "current", "candidate" (shadow runs)
    sem_inspect_shadow_images                  images the candidate inspected beside the current bundle
    sem_inspect_shadow_agreement{scope}        fraction agreeing with the recorded results: scope "label" (the
                                               final label) or "stage1" (the defective / clean decision)
    sem_inspect_shadow_class_agreement{label}  the same per recorded label
    sem_inspect_shadow_errors                  images the candidate failed on
    sem_inspect_shadow_reviewed{which}         on images operators reviewed since: how many each one got right,
                                               which = "current" | "candidate" | "reviewed" (the number reviewed)
    sem_inspect_shadow_latency_seconds         histogram: the candidate's time per image
"""
from __future__ import annotations

from edge_runtime.extras import need

STAGES = ("preprocess", "stage1", "stage2")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, backlog=lambda: 0, unpublished=lambda: 0, rss_mb=lambda: None, bundles=None):
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
        self.shadow_latency = pc.Histogram("sem_inspect_shadow_latency_seconds", "The candidate bundle's time per "
                                           "image (shadow runs)", buckets=BUCKETS, registry=self.registry)
        if bundles is not None:
            self.registry.register(_BundleCollector(pc, bundles))

    def shadow_timed(self, row: dict) -> None:
        """One shadow row (a Shadow listener)."""
        if row.get("latency_ms") is not None:
            self.shadow_latency.observe(row["latency_ms"] / 1e3)

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
    """An Inspector whose every inspect() / inspect_decoded() also feeds the stage-latency histogram."""

    def __init__(self, inspector, metrics: Metrics):
        self._inspector, self._metrics = inspector, metrics

    def inspect(self, *args, **kwargs):
        result = self._inspector.inspect(*args, **kwargs)
        self._metrics.timed(result)
        return result

    def inspect_decoded(self, *args, **kwargs):
        result = self._inspector.inspect_decoded(*args, **kwargs)
        self._metrics.timed(result)
        return result

    def __getattr__(self, name):
        return getattr(self._inspector, name)


class _BundleCollector:
    """The bundles' state (ActiveBundles.snapshot, edge_runtime/service/active.py) as gauges, read at each scrape."""

    def __init__(self, pc, state):
        self._pc, self._state = pc, state

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        state = self._state()
        info = GaugeMetricFamily("sem_inspect_bundle_info", "Bundles loaded, by role", labels=["bundle_id", "role"])
        info.add_metric([state["current"], "current"], 1)
        if state.get("candidate"):
            info.add_metric([state["candidate"], "candidate"], 1)
        yield info
        shadow = state.get("shadow")
        if not shadow:
            return
        yield GaugeMetricFamily("sem_inspect_shadow_images", "Images the candidate inspected", value=shadow["images"])
        yield GaugeMetricFamily("sem_inspect_shadow_errors", "Images the candidate failed on", value=shadow["errors"])
        agreement = GaugeMetricFamily("sem_inspect_shadow_agreement", "Candidate agreeing with the recorded result",
                                      labels=["scope"])
        if shadow["images"]:
            agreement.add_metric(["label"], shadow["agreement"])
            agreement.add_metric(["stage1"], shadow["stage1_agreement"])
        yield agreement
        per_class = GaugeMetricFamily("sem_inspect_shadow_class_agreement", "Candidate agreement per recorded label",
                                      labels=["label"])
        for label, c in shadow["per_class"].items():
            per_class.add_metric([label], c["agreement"])
        yield per_class
        reviewed = GaugeMetricFamily("sem_inspect_shadow_reviewed", "On reviewed images: how many each bundle got "
                                     "right", labels=["which"])
        r = shadow["reviewed"]
        reviewed.add_metric(["reviewed"], r["images"])
        reviewed.add_metric(["current"], r["current_right"])
        reviewed.add_metric(["candidate"], r["candidate_right"])
        yield reviewed
