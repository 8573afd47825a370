"""What the fleet integration costs: watch-mode throughput and peak memory with MQTT + HTTP on, against off.

    python -m benchmarks.fleet_overhead [--models models/real-lite0] [--images DIR] [--n 300] [--rounds 3]
                                        [--threads 2] [--out reports/fleet]

Each run is a fresh `edge-inspect --watch DIR --once` process over the same N images (copied into a new drop
folder), durability full, results in SQLite. "on" adds `--mqtt` to a private Mosquitto on a free loopback port
(started here; `mosquitto` must be installed) and `--http` on another, scraped (GET /metrics and /healthz) once a
second during the run, as a monitoring system would. The two configurations alternate (off, on, off, on, ...)
so that load from other processes on a shared machine falls on both alike.

Per run: throughput = (N - 1) / (last recorded_at - first recorded_at) from the store (the watch loop's steady
rate: model loading and the final MQTT drain are outside it), the process's wall time, its peak RSS (ru_maxrss
from wait4), and for "on" how many results the broker acknowledged. Writes OUT/results.json and OUT/results.md.
Not a test: numbers depend on the machine (recorded with it).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.machine import describe_machine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO / "models" / "real-lite0"
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "hackathon-test"
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_images(folder: Path, n: int) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not found:
        raise SystemExit(f"no images under {folder}")
    return [found[i % len(found)] for i in range(n)]


def start_broker(folder: Path, settings: str = "") -> tuple[subprocess.Popen, int]:
    """A private Mosquitto on a free loopback port (anonymous), with `settings` ({folder} filled in) added to its
    configuration; its log in folder/broker.log."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    import getpass
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                    + settings.format(folder=folder))
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=open(folder / "broker.log", "wb"),
                            stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not start: {(folder / 'broker.log').read_text()[-500:]}")


def scraper(port: int, stop: threading.Event, counts: dict) -> None:
    while not stop.wait(1.0):
        for path in ("/metrics", "/healthz"):
            try:
                con = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                con.request("GET", path)
                if con.getresponse().status == 200:
                    counts[path] = counts.get(path, 0) + 1
                con.close()
            except OSError:
                pass


def one_run(models: Path, images: list[Path], work: Path, threads: int, fleet: tuple[int, int] | None,
            extra: tuple[str, ...] = ()) -> dict:
    """One `edge-inspect --watch --once` process over copies of `images` (extra: more flags, e.g. --shadow)."""
    watch, db = work / "incoming", work / "results.sqlite3"
    watch.mkdir(parents=True)
    for i, src in enumerate(images):
        shutil.copyfile(src, watch / f"{i:05d}{src.suffix.lower()}")
    cmd = [sys.executable, "-m", "edge_runtime.cli", "--models", str(models), "--watch", str(watch), "--db", str(db),
           "--threads", str(threads), "--once", "--summary-seconds", "0", "--log-level", "WARNING", *extra]
    if fleet:
        cmd += ["--mqtt", f"127.0.0.1:{fleet[0]}", "--http", f"127.0.0.1:{fleet[1]}", "--board", "bench"]
    stop, scraped = threading.Event(), {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    thread = None
    if fleet:
        thread = threading.Thread(target=scraper, args=(fleet[1], stop, scraped), daemon=True)
        thread.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stop.set()
    if thread:
        thread.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"edge-inspect failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    con = sqlite3.connect(db)
    try:
        times = [_dt.datetime.fromisoformat(r[0]) for r in con.execute("SELECT recorded_at FROM results ORDER BY id")]
        published = con.execute("SELECT count(*) FROM results WHERE published = 1").fetchone()[0]
    finally:
        con.close()
    span = (times[-1] - times[0]).total_seconds()
    return {"fleet": bool(fleet), "images": len(times), "images_per_s": (len(times) - 1) / span if span else None,
            "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "published": published if fleet else None,
            "scrapes": sum(scraped.values())}


def run_arguments(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark made of watch-service runs: --models --images --n --rounds --threads."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of SEM images (recursive)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    p = run_arguments("python -m benchmarks.fleet_overhead", __doc__)
    p.add_argument("--out", type=Path, default=REPO / "reports" / "fleet")
    args = p.parse_args(argv)
    images = pick_images(args.images, args.n)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        tmp = Path(tmp)
        broker, mqtt_port = start_broker(tmp)
        try:
            for r in range(args.rounds):
                for on in (False, True):
                    fleet = (mqtt_port, free_port()) if on else None
                    run = one_run(args.models, images, tmp / f"run{r}-{'on' if on else 'off'}", args.threads, fleet)
                    runs.append(run)
                    print(f"round {r + 1} {'on ' if on else 'off'}: {run['images_per_s']:.1f} images/s, "
                          f"wall {run['wall_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB"
                          + (f", {run['published']}/{run['images']} acknowledged" if on else ""), flush=True)
        finally:
            broker.terminate()
            broker.wait(10)
    summary = {}
    for key, on in (("off", False), ("on", True)):
        sel = [r for r in runs if r["fleet"] == on]
        summary[key] = {"images_per_s_median": statistics.median(r["images_per_s"] for r in sel),
                        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in sel),
                        "wall_s_median": statistics.median(r["wall_s"] for r in sel)}
    change = summary["on"]["images_per_s_median"] / summary["off"]["images_per_s_median"] - 1
    report = {"models": str(args.models), "n": args.n, "rounds": args.rounds, "threads": args.threads,
              "runs": runs, "summary": summary, "throughput_change": change, "machine": describe_machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    md = ["| fleet | images/s (median) | peak RSS MB (max) | wall s (median) |", "|---|---|---|---|"]
    for key in ("off", "on"):
        s = summary[key]
        md.append(f"| {key} | {s['images_per_s_median']:.1f} | {s['peak_rss_mb_max']:.0f} | {s['wall_s_median']:.1f} |")
    md.append(f"\nthroughput with MQTT + HTTP on: {change:+.1%} against off ({args.rounds} alternating rounds of "
              f"{args.n} images, {args.models.name}, {args.threads} threads)")
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
