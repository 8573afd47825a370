"""Shadow runs: a candidate bundle inspects live images beside the current one, and only its comparison counts.

The recorder hands each image the current bundle inspected (its committed-to-be result row and the image as
decoded once for both bundles) to Shadow.run, for the images `sampled` picks: a fraction of them chosen by the image's sha256 (the same
image always gets the same decision, so a fraction bounds the extra CPU without a random generator). The
candidate's answer goes to the store's shadow_results table in the same transaction as the result it shadows:
it never replaces the recorded result, and a kill -9 keeps both or neither. A candidate that fails on an image
the current bundle could inspect is counted as an error (its message kept).

The comparison (store.shadow_summary: label and Stage-1 agreement, per recorded label, errors, latency, and on
images operators reviewed since which of the two was right) is refreshed in the service's thread and read as a
snapshot by the HTTP API, the metrics and the MQTT stats, which run in other threads.
"""
from __future__ import annotations

import json
import logging
import time

from edge_runtime.db.store import Store, utc_now

log = logging.getLogger("edge_inspect")


class Shadow:
    REFRESH_SECONDS = 2.0

    def __init__(self, inspector, store: Store, fraction: float = 1.0, since: str | None = None,
                 source: str = "config"):
        self.inspector = inspector
        self.bundle_id = inspector.bundle.bundle_id
        self.store = store
        self.fraction = fraction
        self.since = since or utc_now()         # the comparison counts the images shadowed from then on
        self.source = source                    # "config" (shadow:) or a rollout id
        self._threshold = int(fraction * 2**32)
        self._next_refresh = 0.0
        self.listeners = []                     # called with each shadow row (e.g. the latency histogram)
        store.register_bundle(inspector.bundle)
        self.snapshot: dict = self._summary()
        self.images = self.snapshot["images"]      # shadowed so far (counted as they run; the snapshot lags)

    def sampled(self, digest: str | None) -> bool:
        return bool(digest) and (self.fraction >= 1.0 or int(digest[:8], 16) < self._threshold)

    def run(self, row: dict, gray, shared: dict | None = None) -> dict:
        """Inspect the image the current bundle inspected (decoded once for both: the candidate's latency leaves
        the decode out) with the candidate; store the answer beside `row`. shared: the current bundle's backbone
        outputs for this image (Inspector.inspect_decoded), reused where the candidate has the same backbone."""
        shadow = {"result_id": row["id"], "candidate_id": self.bundle_id, "recorded_at": utc_now()}
        t0 = time.perf_counter()
        try:
            r = self.inspector.inspect_decoded(gray, path=row["src_path"], shared=shared)
        except Exception as exc:        # the candidate's failure is its own error count, never the image's
            shadow.update(error=f"{type(exc).__name__}: {exc}"[:500], agree=0, stage1_agree=0,
                          latency_ms=round((time.perf_counter() - t0) * 1e3, 3))
        else:
            shadow.update(label=r.label, stage1_score=round(r.stage1_score, 6), defect_class=r.defect_class,
                          confidence=round(r.confidence, 6), review=int(r.review), latency_ms=round(r.latency_ms, 3),
                          stage2_probs=None if r.stage2_probs is None else json.dumps(r.to_dict()["stage2_probs"]),
                          agree=int(r.label == row["label"]),
                          stage1_agree=int((r.defect_class is None) == (row["defect_class"] is None)))
        self.store.insert_shadow(shadow)
        self.images += 1
        for listener in self.listeners:
            listener(shadow)
        return shadow

    def _summary(self) -> dict:
        return {**self.store.shadow_summary(self.bundle_id, self.since), "since": self.since,
                "fraction": self.fraction, "source": self.source}

    def refresh(self, force: bool = False) -> dict:
        """Recompute the comparison from the committed rows (service thread, no group open), at most every
        REFRESH_SECONDS unless forced."""
        now = time.monotonic()
        if force or now >= self._next_refresh:
            self._next_refresh = now + self.REFRESH_SECONDS
            self.snapshot = self._summary()
        return self.snapshot
