"""Latency summaries, computed the same way for every runtime."""
from __future__ import annotations

import math

import numpy as np


def summarize(latencies_ms) -> dict:
    """mean/std/min/max and p50/p90/p99 (linear interpolation) in ms; throughput = 1000 / mean."""
    arr = np.asarray(latencies_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no latencies to summarise")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("latencies must be finite and non-negative")
    mean = float(arr.mean())
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    return {
        "count": int(arr.size),
        "mean_ms": mean,
        "std_ms": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min_ms": float(arr.min()),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(arr.max()),
        "throughput_ips": (1000.0 / mean) if mean > 0 else math.inf,
    }
