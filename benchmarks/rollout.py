"""What rollouts cost on a board (issue 20): shadow mode per image, memory with two bundles loaded, and the time
from a rollout message to the promotion.

    python -m benchmarks.rollout [--models models/real-lite0] [--images DIR] [--n 300] [--rounds 3]
                                 [--fraction 0.1] [--threads 2] [--out reports/rollout]

Shadow cost: fresh `edge-inspect --watch DIR --once` processes over the same N images (benchmarks/fleet_overhead.py's
run), alternating shadow off / on with two candidates so that load from other jobs falls on all: an adapted one
(the same model files under another manifest, as `edge-inspect adapt` derives: its backbones are shared with the
current bundle, so it costs its heads) and a retrained one (the same networks in model files whose bytes differ:
nothing shared), each with `--shadow-fraction F`; per run the steady rate from the store's recorded_at and the
process's peak RSS (wait4). The ratio is the median time per image with the shadow over without, same run. A run
with `--shadow-fraction 1` gives the peak RSS with both bundles' interpreters busy on every image.

Rollout to promotion: a private Mosquitto, an HTTP server on loopback holding the packed candidate (the reference
bundle re-manifested, signed with a fresh key: `python -m convert keygen|sign`, `python -m central.rollout
pack`), one board (`--bundles-dir`, `--trusted-keys`) fed images at a steady rate; the clock runs from `rollout
publish` to the board's status saying "promoted" (download, sha256, unpack, the bundle reader's checks and the
signature, loading the candidate, shadowing --shadow-images images, the decision and the swap). Writes
OUT/results.json and OUT/results.md. Not a test: the numbers depend on the machine (recorded with it).
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.fleet_overhead import REPO, one_run, pick_images, run_arguments, start_broker
from benchmarks.machine import describe_machine

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run(*cmd: str) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def remanifest(src: Path, dst: Path, tag: str) -> Path:
    """The same model files under another manifest (another bundle id): a candidate that agrees everywhere."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.sig", "*.md", "*.json"))
    manifest = yaml.safe_load((dst / "manifest.yaml").read_text())
    manifest["source_run"] = f"{manifest.get('source_run')} ({tag})"
    (dst / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dst


def with_other_backbones(src: Path, dst: Path) -> Path:
    """A stand-in for a retrained candidate: the same networks (same cost, same answers) in model files whose bytes
    differ (one character of the converter's description string), so the board cannot share their backbones."""
    remanifest(src, dst, "other backbones")
    manifest = yaml.safe_load((dst / "manifest.yaml").read_text())
    for variant in manifest["variants"].values():
        for entry in variant.values():
            path = dst / entry["file"]
            data = path.read_bytes()
            assert data.count(b"MLIR Converted.") == 1, f"{path}: no converter description to alter"
            path.write_bytes(data.replace(b"MLIR Converted.", b"MLIR Converted!"))
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dst


def shadow_cost(args, images, tmp: Path) -> dict:
    candidate = remanifest(args.models, tmp / "candidate", "shadow benchmark")
    retrained = with_other_backbones(args.models, tmp / "retrained")
    runs = []
    shadow = ("--shadow-fraction", str(args.fraction))
    # an adapted candidate (the review -> adapt loop: its parent's backbones, byte-identical, new heads) and a
    # retrained one (other backbone files): the board shares a backbone only when its file is the same
    configs = [("off", ()), (f"shadow {args.fraction:g}", ("--shadow", str(candidate), *shadow)),
               (f"shadow {args.fraction:g} other backbones", ("--shadow", str(retrained), *shadow))]
    for r in range(args.rounds):
        for name, extra in configs:
            one = one_run(args.models, images, tmp / f"run{r}-{len(runs)}", args.threads, None, extra)
            one["config"] = name
            runs.append(one)
            print(f"round {r + 1} {name}: {one['images_per_s']:.1f} images/s, peak RSS {one['peak_rss_mb']:.0f} MB",
                  flush=True)
    both = one_run(args.models, images, tmp / "both", args.threads, None,
                   ("--shadow", str(candidate), "--shadow-fraction", "1"))
    single = [r["peak_rss_mb"] for r in runs if r["config"] == "off"]
    per_image = {name: statistics.median(1e3 / r["images_per_s"] for r in runs if r["config"] == name)
                 for name, _ in configs}
    k = len(configs)
    ratios = {name: [runs[r]["images_per_s"] / runs[r + i]["images_per_s"] for r in range(0, len(runs), k)]
              for i, (name, _) in enumerate(configs) if i}
    cpu_ratios = {name: [runs[r + i]["cpu_s"] / runs[r]["cpu_s"] for r in range(0, len(runs), k)]
                  for i, (name, _) in enumerate(configs) if i}
    return {"runs": runs, "ms_per_image": per_image, "ratios": ratios, "cpu_ratios": cpu_ratios,
            "ratio_median": {n: statistics.median(v) for n, v in ratios.items()},
            "cpu_ratio_median": {n: statistics.median(v) for n, v in cpu_ratios.items()},
            "fraction": args.fraction, "peak_rss_mb_one_bundle": max(single),
            "peak_rss_mb_two_bundles": both["peak_rss_mb"], "both_images_per_s": both["images_per_s"]}


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def rollout_time(args, images, tmp: Path) -> dict:
    import paho.mqtt.client as mqtt

    keys, board = tmp / "keys", tmp / "board"
    run("-m", "convert", "keygen", "--out", str(keys), "--name", "bench")
    candidate = remanifest(args.models, tmp / "new-bundle", "rollout benchmark")
    run("-m", "convert", "sign", str(candidate), "--key", str(keys / "bench.key"))
    www = tmp / "www"
    desc = json.loads(run("-m", "central.rollout", "pack", str(candidate), "--out", str(www)))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broker, port = start_broker(tmp)
    (board / "incoming").mkdir(parents=True)
    (board / "bundles").mkdir()
    shutil.copytree(args.models, board / "bundles" / "installed")
    run("-m", "convert", "sign", str(board / "bundles" / "installed"), "--key", str(keys / "bench.key"))
    os.symlink(board / "bundles" / "installed", board / "bundles" / "current")
    log = open(board / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "--models", str(board / "bundles" / "current"),
                             "--watch", str(board / "incoming"), "--db", str(board / "results.sqlite3"),
                             "--threads", str(args.threads), "--summary-seconds", "0", "--settle-seconds", "0.1",
                             "--mqtt", f"127.0.0.1:{port}", "--board", "bench", "--bundles-dir", str(board / "bundles"),
                             "--trusted-keys", str(keys / "bench.pub")], cwd=REPO, env=ENV, stdout=log, stderr=log)
    seen: dict[str, float] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-rollout")

    def on_message(cl, u, msg):
        doc = json.loads(msg.payload)
        bundle = doc.get("bundle") or {}
        if bundle.get("candidate") == desc["bundle_id"]:
            seen.setdefault("shadowing", time.perf_counter())
        change = bundle.get("last_change") or {}
        if change.get("rollout") == "bench" and change.get("what") not in ("shadowing", None):
            seen.setdefault(change["what"], time.perf_counter())
            seen["why"] = change.get("why")
    client.on_message = on_message
    client.on_connect = lambda cl, *a: cl.subscribe("sem-inspect/bench/status", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop = threading.Event()

    def feed():
        k = 0
        while not stop.is_set():
            src = images[k % len(images)]
            tmpname = board / "incoming" / f".{k:06d}.part"
            shutil.copyfile(src, tmpname)
            os.rename(tmpname, board / "incoming" / f"{k:06d}{src.suffix.lower()}")
            k += 1
            stop.wait(1.0 / args.rate)
    try:
        deadline = time.monotonic() + 120
        while b"watching" not in (board / "service.log").read_bytes() and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the board stopped: {(board / 'service.log').read_text()[-2000:]}")
            time.sleep(0.1)
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(2.0)
        t0 = time.perf_counter()
        run("-m", "central.rollout", "publish", "--broker", f"127.0.0.1:{port}", "--boards", "bench",
            "--archive", desc["archive"], "--url", f"http://127.0.0.1:{server.server_address[1]}/"
            f"{Path(desc['archive']).name}", "--id", "bench", "--shadow-images", str(args.shadow_images),
            "--shadow-minutes", "10", "--min-agreement", "0.9", "--min-stage1-agreement", "0.9")
        deadline = time.monotonic() + 600
        while not ({"promoted", "rejected", "refused"} & set(seen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
        log.close()
        client.loop_stop()
        server.shutdown()
        broker.terminate()
        broker.wait(10)
    outcome = next((k for k in ("promoted", "rejected", "refused") if k in seen), "timed out")
    return {"bundle_bytes": desc["bytes"], "outcome": outcome, "why": seen.get("why"),
            "to_shadow_s": seen["shadowing"] - t0 if "shadowing" in seen else None,
            "to_outcome_s": seen[outcome] - t0 if outcome in seen else None,
            "shadow_images": args.shadow_images, "feed_rate": args.rate}


def main(argv: list[str] | None = None) -> int:
    p = run_arguments("python -m benchmarks.rollout", __doc__)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--shadow-images", type=int, default=50, help="the rollout's shadow.images")
    p.add_argument("--rate", type=float, default=20.0, help="images per second fed to the board during the rollout")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "rollout")
    args = p.parse_args(argv)
    images = pick_images(args.images, args.n)
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        shadow = shadow_cost(args, images, Path(tmp) / "shadow")
        rollout = rollout_time(args, images, Path(tmp) / "rollout")
    report = {"models": str(args.models), "n": args.n, "rounds": args.rounds, "threads": args.threads,
              "shadow": shadow, "rollout": rollout, "machine": describe_machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    s, r = shadow, rollout
    md = [f"| measure | value |", "|---|---|",
          f"| ms per image, shadow off (median of {args.rounds}) | {s['ms_per_image']['off']:.2f} |",
          *[row for name in s["ratios"] for row in (
              f"| ms per image, {name} (median of {args.rounds}) | {s['ms_per_image'][name]:.2f} |",
              f"| same-run ratio {name} / off (median; each round: "
              f"{', '.join(f'{x:.3f}' for x in s['ratios'][name])}) | {s['ratio_median'][name]:.3f} x |",
              f"| same-run CPU-time ratio {name} / off, whole process incl. loading the second bundle (median; "
              f"each round: {', '.join(f'{x:.3f}' for x in s['cpu_ratios'][name])}) | "
              f"{s['cpu_ratio_median'][name]:.3f} x |")],
          f"| peak RSS, one bundle (max) | {s['peak_rss_mb_one_bundle']:.0f} MB |",
          f"| peak RSS, two bundles (shadow on every image) | {s['peak_rss_mb_two_bundles']:.0f} MB |",
          f"| rollout message -> candidate shadowing ({r['bundle_bytes'] / 1e6:.1f} MB archive) | "
          f"{r['to_shadow_s'] if r['to_shadow_s'] is None else round(r['to_shadow_s'], 2)} s |",
          f"| rollout message -> {r['outcome']} ({r['shadow_images']} images shadowed at {r['feed_rate']:g}/s) | "
          f"{r['to_outcome_s'] if r['to_outcome_s'] is None else round(r['to_outcome_s'], 2)} s |"]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
