"""Peak memory of the watch service per input: `python -m benchmarks.watch_memory --models BUNDLE`.

For each input (SEM-like frames from 1024x1024 to 7000x7000, 8/16-bit and float, grayscale and colour,
PNG/TIFF/JPEG) the service runs in a fresh process, `edge-inspect --watch DIR --once`, on a folder holding only
that file; its peak RSS is the kernel's (ru_maxrss from wait4), so it includes Python, the interpreter and the
bundle. Inputs are written by a separate process and this one imports neither numpy nor Pillow: a child's
ru_maxrss counts the parent's resident memory at fork time, so the parent must stay small. The outcome (inspected, or quarantined and why) is read back from the service's own database. One
line per input, a Markdown table at the end, and with --out a JSON file.

    python -m benchmarks.watch_memory --models models/real-128-mnv3 [--only 4096] [--out reports/mem.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str           # file name, e.g. "4096-u16.tif"
    side: int           # width = height
    kind: str           # u8 | u16 | f32 | rgb | rgba
    fmt: str            # PNG | TIFF | JPEG
    compression: str | None = None


CASES = [
    Case("idle.txt", 0, "none", "none"),                     # the service with nothing to decode
    Case("1024-u8.png", 1024, "u8", "PNG"), Case("1024-u16.png", 1024, "u16", "PNG"),
    Case("1024-u8.tif", 1024, "u8", "TIFF"), Case("1024-u16.tif", 1024, "u16", "TIFF"),
    Case("1024-f32.tif", 1024, "f32", "TIFF"), Case("1024-rgb.jpg", 1024, "rgb", "JPEG"),
    Case("1024-rgba.png", 1024, "rgba", "PNG"),
    Case("4096-u8.png", 4096, "u8", "PNG"), Case("4096-u16.png", 4096, "u16", "PNG"),
    Case("4096-u8.tif", 4096, "u8", "TIFF"), Case("4096-u16.tif", 4096, "u16", "TIFF"),
    Case("4096-u16-deflate.tif", 4096, "u16", "TIFF", "tiff_deflate"),
    Case("4096-rgb.jpg", 4096, "rgb", "JPEG"), Case("4096-rgb.png", 4096, "rgb", "PNG"),
    Case("4096-rgba.png", 4096, "rgba", "PNG"), Case("4096-f32.tif", 4096, "f32", "TIFF", "tiff_deflate"),
    Case("4096-rgb.tif", 4096, "rgb", "TIFF"),                # uncompressed: 48 MB of file bytes
    Case("5000-rgba.png", 5000, "rgba", "PNG"),              # near the default decode budget (128 MB)
    Case("7000-u8.png", 7000, "u8", "PNG"), Case("7000-rgb.jpg", 7000, "rgb", "JPEG"),
    Case("7000-rgba.png", 7000, "rgba", "PNG"), Case("7000-f32.tif", 7000, "f32", "TIFF", "tiff_deflate"),
]


def frame(side: int, kind: str):
    """A compressible SEM-like frame: line/space grating with a bright band, in the requested kind."""
    import numpy as np
    from PIL import Image

    x = np.arange(side, dtype=np.float32)
    lines = (np.sin(x / 6.0) > 0).astype(np.float32) * 0.5 + 0.2
    gray = np.broadcast_to(lines, (side, side)).copy()
    gray[side // 3: side // 3 + side // 50, :] = 0.95
    del lines
    if kind == "u8":
        return Image.fromarray((gray * 255).astype(np.uint8))
    if kind == "u16":
        return Image.fromarray((gray * 65535).astype(np.uint16))
    if kind == "f32":
        return Image.fromarray(gray)
    img = Image.fromarray((gray * 255).astype(np.uint8))
    del gray
    return img.convert("RGBA" if kind == "rgba" else "RGB")


def make_input(case: Case, folder: Path) -> Path:
    """Write one input file (in this process: call it through write_input from the measuring process)."""
    path = folder / case.name
    if case.kind == "none":
        return path
    img = frame(case.side, case.kind)
    kwargs = {"compression": case.compression} if case.compression else {}
    if case.fmt == "JPEG":
        kwargs["quality"] = 90
    img.save(path, format=case.fmt, **kwargs)
    return path


def write_input(case: Case, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "benchmarks.watch_memory", "--write", case.name, "--into", str(folder)],
                   check=True, cwd=REPO)
    return folder / case.name


def run_service(bundle: Path, folder: Path, threads: int | None, timeout: float) -> tuple[int, float, float]:
    """One `edge-inspect --watch --once` in a fresh process: (exit status, peak RSS MB, wall seconds)."""
    cmd = [sys.executable, "-m", "edge_runtime.cli", "--models", str(bundle), "--watch", str(folder / "in"),
           "--db", str(folder / "results.sqlite3"), "--once", "--settle-seconds", "0", "--summary-seconds", "0",
           "--log-level", "WARNING"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(folder / "service.log", "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)     # this tree's edge_runtime
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - t0


def outcome(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT outcome, label, reason FROM results").fetchall()
    finally:
        con.close()
    if not rows:
        return "-"
    kind, label, reason = rows[0]
    return f"inspected ({label})" if kind == "inspected" else f"quarantined: {reason}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.watch_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, metavar="BUNDLE", help="model bundle folder (required)")
    ap.add_argument("--only", default="", help="run only the inputs whose name contains this text")
    ap.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the service's)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--write", metavar="NAME", help=argparse.SUPPRESS)     # internal: write one input file
    ap.add_argument("--into", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write:
        make_input(next(c for c in CASES if c.name == args.write), args.into)
        return 0
    if args.models is None:
        ap.error("--models BUNDLE is required")
    args.models = args.models.resolve()
    results = []
    print(f"bundle {args.models}; one fresh `edge-inspect --watch --once` per input", flush=True)
    with tempfile.TemporaryDirectory(prefix="watch-memory-") as tmp:
        for case in CASES:
            if args.only and args.only not in case.name:
                continue
            folder = Path(tmp) / case.name
            (folder / "in").mkdir(parents=True)
            path = write_input(case, folder / "in")
            size = path.stat().st_size if path.exists() else 0
            rc, peak, wall = run_service(args.models, folder, args.threads, args.timeout)
            what = outcome(folder / "results.sqlite3") if rc == 0 else f"exit {rc}"
            row = {**asdict(case), "file_bytes": size, "exit": rc, "peak_rss_mb": round(peak, 1),
                   "wall_s": round(wall, 2), "outcome": what}
            results.append(row)
            print(f"{case.name:<22} {size / 1e6:8.2f} MB file  peak RSS {peak:7.1f} MB  {wall:6.1f} s  {what}",
                  flush=True)
            if rc != 0:
                sys.stderr.write((folder / "service.log").read_text(errors="replace")[-3000:])
    print("\n| input | file MB | peak RSS MB | outcome |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['file_bytes'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} | {r['outcome']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(args.models), "results": results}, indent=1))
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
