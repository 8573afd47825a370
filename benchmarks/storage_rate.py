"""How fast the collector's storage commits results: add_results on PostgreSQL (a throwaway server, fsync on:
benchmarks/pgserver.py) and on SQLite (WAL, synchronous=FULL), batches of 1, 50 and 500 results made the way a
board publishes them (benchmarks/attack.valid_result, parsed by the collector's schema.parse_result), every
result new. Storage alone: no broker, no MQTT (the load benchmark measures the whole path).

    python -m benchmarks.storage_rate [--seconds 5] [--batches 1,50,500] [--out FILE.json]

Prints one line per back-end and batch size: results/s, commit time per batch (p50, p99), and the CPU the
collector's process spent per 1,000 results (the server's own CPU is not in it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.attack import valid_result
from benchmarks.pgserver import PostgresServer, unavailable_reason
from edge_runtime.fleet.messages import parse_result
from central.storage import STORED, open_storage
from edge_runtime.exits import utc_now


def messages(n: int, start: int, rng: random.Random, boards: int = 100) -> list:
    out = []
    for i in range(start, start + n):
        board = f"board-{i % boards:03d}"
        msg = {**valid_result(board, i, rng), "recorded_at": utc_now()}
        out.append(parse_result(board, json.dumps(msg).encode()))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(db: str, batch: int, seconds: float, rng: random.Random) -> dict:
    """add_results of `batch` new results at a time for about `seconds`."""
    storage = open_storage(db)
    try:
        next_id, stored, times, cpu = 1, 0, [], 0.0
        while sum(times) < seconds:
            chunk = messages(batch, next_id, rng)          # made and parsed outside the timing
            next_id += batch
            c, s = time.process_time(), time.perf_counter()
            outcomes = storage.add_results(chunk)
            times.append(time.perf_counter() - s)
            cpu += time.process_time() - c
            assert outcomes == [STORED] * batch, outcomes
            stored += batch
        wall = sum(times)
        assert storage.counts()["results"] == stored
    finally:
        storage.close()
    return {"batch": batch, "results": stored, "seconds": round(wall, 3),
            "results_per_s": round(stored / wall, 1), "commit_p50_ms": round(percentile(times, 0.5) * 1000, 2),
            "commit_p99_ms": round(percentile(times, 0.99) * 1000, 2),
            "cpu_ms_per_1000": round(cpu / stored * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.storage_rate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per back-end and batch size (default 5)")
    p.add_argument("--batches", default="1,50,500")
    p.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    figures = {"machine": {"cpus": os.cpu_count(), "date": utc_now()}, "postgresql": [], "sqlite": []}
    reason = unavailable_reason()
    if reason:
        print(f"postgresql: skipped ({reason})")
    else:
        with PostgresServer() as pg:
            for batch in batches:
                figures["postgresql"].append(measure(pg.create_database(), batch, args.seconds, rng))
                print("postgresql", figures["postgresql"][-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="storage-rate-") as tmp:
        for batch in batches:
            figures["sqlite"].append(measure(str(Path(tmp) / f"central-{batch}.sqlite3"), batch, args.seconds, rng))
            print("sqlite", figures["sqlite"][-1], flush=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
