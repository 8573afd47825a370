"""The review page's figures: page load time with N results in the store, the review server's memory.

    python -m benchmarks.review_page [--results 10000] [--models models/real-lite0] [--loads 7]
                                     [--out reports/review] [--screenshot docs/review_page.png]

Builds a result database the way the service writes it (edge_runtime.db.store, the bundle registered, N rows
with Stage-1 scores, Stage-2 probabilities, review flags and a few hundred earlier reviews) over synthetic SEM
images in processed/, starts `edge-inspect review` as its own process, and measures:
  - the API: GET /api/queue (first page, 100 items), /api/summary, /api/meta, one image; wall ms over HTTP;
  - the page in headless Chromium (benchmarks/browser.py): from navigation start until the queue is listed
    and the first image has loaded (the page marks that moment), each load on a fresh navigation;
  - saving a correction: POST /api/results/ID/reviews until the 201 (durable: fsynced);
  - the server's resident memory (VmRSS, and the peak VmHWM) from /proc after all of that.
Writes OUT/results.json and OUT/results.md, prints the table; --screenshot saves the page as a PNG.
Not a test: numbers depend on the machine (recorded with it).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe_machine
from benchmarks.stats import summarize

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO / "models" / "real-lite0"   # the shipped reference bundle
IMAGES_PER_CLASS = 8


def build_site(root: Path, n: int, models: Path, seed: int = 0) -> dict:
    """root/results.sqlite3 + root/processed/ holding n results (hard links to a few synthetic SEM images
    per class, so 10,000 files cost little disk)."""
    from edge_runtime.bundle import load_bundle
    from edge_runtime.review.reviews import Reviews
    from edge_runtime.db.store import Store
    from train.synth import CLASSES, image_rng, render

    bundle = load_bundle(models)
    rng = np.random.default_rng(seed)
    processed = root / "processed"
    (root / "pool").mkdir(parents=True)
    processed.mkdir()
    pool: dict[str, list[Path]] = {}
    from PIL import Image
    for ci, cls in enumerate(CLASSES):
        for i in range(IMAGES_PER_CLASS):
            path = root / "pool" / f"{cls}_{i}.png"
            Image.fromarray(render(cls, image_rng(seed, ci, i), 128)).save(path)
            pool.setdefault(cls, []).append(path)
    store = Store(root / "results.sqlite3", durable=False)
    store.register_bundle(bundle)
    classes, clean = list(bundle.stage2_classes), bundle.clean_label
    start = _dt.datetime(2026, 11, 1, tzinfo=_dt.timezone.utc)
    for k in range(n):
        defective = rng.random() < 0.3
        score = float(rng.uniform(bundle.stage1_threshold, 1.0) if defective
                      else rng.uniform(0.0, bundle.stage1_threshold))
        row = {"outcome": "inspected", "stage1_score": round(score, 6), "latency_ms": 3.0, "variant": "int8",
               "state": "done", "journaled": 1, "bundle_id": bundle.bundle_id,
               "recorded_at": (start + _dt.timedelta(seconds=k * 120)).isoformat(timespec="milliseconds")}
        if defective:
            probs = rng.dirichlet(np.full(len(classes), 0.6))
            top = int(probs.argmax())
            row.update(label=classes[top], defect_class=classes[top], confidence=round(float(probs[top]), 6),
                       review=int(probs[top] < bundle.stage2_review_floor),
                       stage2_probs=json.dumps({c: round(float(p), 6) for c, p in zip(classes, probs)}))
        else:
            row.update(label=clean, defect_class=None, confidence=round(1 - score, 6), review=0)
        name = f"wafer{k // 500:03d}_site{k % 500:03d}.png"
        source = pool[row["label"]][k % IMAGES_PER_CLASS]
        os.link(source, processed / name)
        row.update(key=f"{k:064x}/{name}", name=name, src_path=str(root / "incoming" / name),
                   dest_path=str(processed / name), size=source.stat().st_size, mtime_ns=0, sha256=None)
        store.insert(row)
    store.commit()
    reviews = Reviews(store, processed)
    taxonomy = list(bundle.taxonomy)
    for rid in rng.choice(np.arange(1, n + 1), size=min(300, n // 10), replace=False):
        item = reviews.item(int(rid))
        label = item["label"] if rng.random() < 0.6 else taxonomy[int(rng.integers(len(taxonomy)))]
        reviews.add(int(rid), label, "benchmark", 0)
    store.close()
    return {"db": root / "results.sqlite3", "processed": processed, "bundle_id": bundle.bundle_id}


def start_server(db: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "review", "--db", str(db), "--http",
                             "127.0.0.1:0", "--log-level", "WARNING"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stderr.readline()
    if "serving http://" not in line:
        proc.kill()
        raise RuntimeError(f"review server did not start: {line}{proc.stderr.read()}")
    return proc, line.split("serving ", 1)[1].split(" ", 1)[0]


def memory_mb(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
              if line.startswith(("VmRSS:", "VmHWM:"))}
    return {"rss_mb": round(values["VmRSS"], 1), "peak_rss_mb": round(values["VmHWM"], 1)}


def time_get(port: int, path: str, runs: int) -> dict:
    times, size = [], 0
    for _ in range(runs):
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        con.request("GET", path)
        resp = con.getresponse()
        body = resp.read()
        times.append((time.perf_counter() - t0) * 1e3)
        con.close()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        size = len(body)
    return {**summarize(times), "bytes": size}


def time_reviews(port: int, ids: list[int]) -> dict:
    """One correction POSTed per result (each a first review), wall ms until the 201 is read."""
    times = []
    for rid in ids:
        body = json.dumps({"label": "other", "reviewer": "benchmark", "expected_review_id": 0}).encode()
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.perf_counter()
        con.request("POST", f"/api/results/{rid}/reviews", body, {"Content-Type": "application/json"})
        resp = con.getresponse()
        resp.read()
        times.append((time.perf_counter() - t0) * 1e3)
        con.close()
        if resp.status != 201:
            raise RuntimeError(f"POST review of {rid}: HTTP {resp.status}")
    return summarize(times)


def page_loads(url: str, loads: int, screenshot: Path | None) -> dict:
    from benchmarks.browser import BrowserUnavailable, quit_chromium, start_chromium, wait_for
    try:
        driver = start_chromium((1600, 1000))
    except BrowserUnavailable as exc:
        return {"skipped": str(exc)}
    try:
        ready, dom = [], []
        for _ in range(loads + 1):                  # the first load warms the browser's own caches
            driver.get("about:blank")
            driver.get(url)
            ready.append(float(wait_for(driver, "return window.reviewReadyMs", timeout=120)))
            dom.append(float(driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0]; return n.domContentLoadedEventEnd")))
        items = driver.execute_script("return document.querySelectorAll('#queue li').length")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            wait_for(driver, "return document.getElementById('states').textContent.length > 0")
            driver.save_screenshot(str(screenshot))
        return {"ready_ms": summarize(ready[1:]), "first_load_ready_ms": ready[0],
                "dom_content_loaded_ms": summarize(dom[1:]), "queue_items_listed": items}
    finally:
        quit_chromium(driver)


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Review page with {r['results']:,} results in the store ({r['reviews']} reviewed); "
             f"{m['cpu_model']}, {m['cores']} cores, {m['os']}, {m['python']}; {m['date']}.", "",
             "| measure | median ms | p90 ms | max ms |", "|---|---|---|---|"]
    page = r["page"]
    if "skipped" in page:
        lines.append(f"| page load in Chromium | skipped: {page['skipped']} | | |")
    else:
        p = page["ready_ms"]
        lines.append(f"| page load, navigation -> queue listed + first image shown ({p['count']} loads) | "
                     f"{p['p50_ms']:.0f} | {p['p90_ms']:.0f} | {p['max_ms']:.0f} |")
        d = page["dom_content_loaded_ms"]
        lines.append(f"| DOMContentLoaded | {d['p50_ms']:.0f} | {d['p90_ms']:.0f} | {d['max_ms']:.0f} |")
    for path, s in r["api"].items():
        lines.append(f"| GET {path} ({s['bytes']:,} bytes) | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['max_ms']:.1f} |")
    s = r["save_review"]
    lines.append(f"| POST a correction, until saved ({s['count']} reviews) | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | "
                 f"{s['max_ms']:.1f} |")
    mem = r["server_memory"]
    lines += ["", f"Review server memory: {mem['after_start']['rss_mb']} MB resident after start, "
                  f"{mem['after_load']['rss_mb']} MB after the loads (peak {mem['after_load']['peak_rss_mb']} MB)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.review_page", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=int, default=10000, help="results in the store (default 10000)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="bundle registered as the results' model")
    p.add_argument("--loads", type=int, default=7, help="page loads to time (after one warm-up)")
    p.add_argument("--api-runs", type=int, default=20, help="requests per API route")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "review", help="results.json / results.md")
    p.add_argument("--screenshot", type=Path, help="save the loaded page here (PNG)")
    args = p.parse_args(argv)
    if args.results < 10 or args.loads < 1 or args.api_runs < 1:
        p.error("--results >= 10, --loads >= 1, --api-runs >= 1")
    work = Path(tempfile.mkdtemp(prefix="review-bench-"))
    proc = None
    try:
        t0 = time.perf_counter()
        site = build_site(work, args.results, args.models)
        print(f"store with {args.results:,} results built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        proc, url = start_server(site["db"])
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        time.sleep(0.5)
        after_start = memory_mb(proc.pid)
        api = {path: time_get(port, path, args.api_runs)
               for path in ("/api/queue?state=unreviewed&limit=100&offset=0", "/api/summary", "/api/meta",
                            "/api/results/1/image")}
        page = page_loads(url, args.loads, args.screenshot)
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        con.request("GET", f"/api/queue?state=unreviewed&limit={args.api_runs}")
        queue = json.loads(con.getresponse().read())["items"]
        save = time_reviews(port, [i["id"] for i in queue])
        after_load = memory_mb(proc.pid)
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        con.request("GET", "/api/summary")
        reviews = json.loads(con.getresponse().read())["reviews"]
        report = {"results": args.results, "reviews": reviews, "machine": describe_machine(), "api": api,
                  "save_review": save, "page": page,
                  "server_memory": {"after_start": after_start, "after_load": after_load}}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    table = markdown(report)
    (args.out / "results.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
