"""`python -m benchmarks`: per-stage and end-to-end benchmarks of a model bundle, runtimes side by side.

    python -m benchmarks --models models/demo --images data/ --threads 1,2 --out reports/bench

Every measurement runs in a fresh worker process (benchmarks.worker) so its memory numbers are its own
and one runtime's warm caches or thread pools never flatter another's. Results: results.json,
results.md and PNG plots in --out.

With labelled images, the bundle's gate is also measured as it is: its defect recall and clean false-positive
rate at its own threshold, through the runtime, and from them the flagged fraction and the cost per image of
the two-stage bundle against one 8-class model of Stage-2 size at each prevalence (results.md, "Two-stage vs
one 8-class model").

This file is the entry point: the flags, then the session (benchmarks/session.py), the runners built from the
mode table (benchmarks/runners.py, MODES) run in turn, and the report (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import report
from benchmarks.runners import MODES, errors
from benchmarks.session import RUNTIMES, Session, SetupError, log
from benchmarks.worker import Workers


class UsageError(Exception):
    pass


def _csv(text: str, conv, name: str) -> list:
    try:
        values = [conv(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"--{name}: cannot parse {text!r} ({exc})") from None
    if not values:
        raise UsageError(f"--{name}: empty list")
    return list(dict.fromkeys(values))


def parse_args(argv=None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark a model bundle: per stage (init, first inference, steady-state latency, "
                    "throughput, RSS, MACs) and end to end at several defect prevalences, for each runtime "
                    "installed (LiteRT, tflite-runtime, Keras) side by side.")
    ap.add_argument("--models", required=True, metavar="BUNDLE", help="bundle folder (with manifest.yaml)")
    ap.add_argument("--threads", default=",".join(str(t) for t in dict.fromkeys([1, cores])),
                    help="comma-separated thread counts (default: 1 and all cores)")
    ap.add_argument("--runtime", default=",".join(RUNTIMES),
                    help=f"comma-separated runtimes to compare (default: {','.join(RUNTIMES)}; each where installed)")
    ap.add_argument("--prevalence", default="0.05,0.2,0.5", help="defect prevalences for the end-to-end streams")
    ap.add_argument("--images", metavar="DIR", help="labelled images in class folders (DIR/<class>/*.png) for the "
                    "end-to-end benchmark (default: the test split of the bundle's source run, when present)")
    ap.add_argument("--out", metavar="DIR", help="output folder (default: reports/bench-<date>)")
    ap.add_argument("--runs", type=int, default=50, help="steady-state runs per stage configuration (default 50)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="time box per configuration; stops early once 5 runs are in (default 20)")
    ap.add_argument("--stream-length", type=int, default=60, help="images per prevalence stream (default 60)")
    ap.add_argument("--variants", help="comma-separated bundle variants (default: all in the manifest)")
    ap.add_argument("--keras-run", metavar="runs/NAME", help="training run with stage1.keras/stage2.keras for the "
                    "Keras (original notebook) path (default: the manifest's source_run)")
    ap.add_argument("--light-gate", default="auto", metavar="auto|off|MODEL.tflite",
                    help="lightweight Stage-1 gate for the cost model: auto = the bundle's Stage 1 if it is "
                         "mobilenet_v3_small, else a random-weight MobileNetV3Small exported int8 (needs TF); "
                         "or a .tflite file; or off")
    ap.add_argument("--gate-images", type=int, default=0, metavar="N",
                    help="labelled images the gate's recall and false-positive rate are measured on (both stages "
                         "run on each; default 0 = all of them, else N spread evenly over them)")
    ap.add_argument("--seed", type=int, default=0, help="seed for stream sampling")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a worker is abandoned")
    args = ap.parse_args(argv)
    args.threads = _csv(args.threads, int, "threads")
    args.runtime = _csv(args.runtime, str, "runtime")
    args.prevalence = _csv(args.prevalence, float, "prevalence")
    if any(t < 1 for t in args.threads):
        raise UsageError("--threads: thread counts must be >= 1")
    unknown = [r for r in args.runtime if r not in RUNTIMES]
    if unknown:
        raise UsageError(f"--runtime: unknown {unknown}; choose from {list(RUNTIMES)}")
    if any(not 0.0 <= p <= 1.0 for p in args.prevalence):
        raise UsageError("--prevalence: values must lie in [0, 1]")
    if args.runs < 1 or args.stream_length < 1 or args.max_seconds <= 0 or args.gate_images < 0:
        raise UsageError("--runs and --stream-length must be >= 1, --gate-images >= 0 and --max-seconds > 0")
    args.variants = _csv(args.variants, str, "variants") if args.variants else None
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        session = Session(args, argv)
    except (UsageError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = session.skeleton()
    workers = Workers(args.timeout)
    runners = [make(session, workers) for make in MODES.values()]
    session.total = sum(runner.planned() for runner in runners)
    failures = 0
    t_start = time.perf_counter()
    try:
        for runner in runners:
            part = runner.run(results)
            failures += errors(part)
            results.update(part)
    finally:
        workers.close()
    results["elapsed_s"] = time.perf_counter() - t_start
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    paths = report.write_all(session.out, results)
    log(f"done in {results['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return 1 if failures else 0
