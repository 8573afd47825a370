"""`python -m benchmarks`: per-stage and end-to-end benchmarks of a model bundle, runtimes side by side.

    python -m benchmarks --models models/demo --images data/ --threads 1,2 --out reports/bench

Every measurement runs in a fresh worker process (benchmarks.worker) so its memory numbers are its own
and one runtime's warm caches or thread pools never flatter another's. Results: results.json,
results.md and PNG plots in --out.

With labelled images, the bundle's gate is also measured as it is: its defect recall and clean false-positive
rate at its own threshold, through the runtime, and from them the flagged fraction and the cost per image of
the two-stage bundle against one 8-class model of Stage-2 size at each prevalence (results.md, "Two-stage vs
one 8-class model").
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import costmodel, report
from benchmarks.machine import describe_machine, nominal_peak
from benchmarks.schema import (FORMAT, BundleInfo, CostModel, GateCost, Images, LightGate, Machine, PairedRun,
                               PipelineRun, PrevalenceSummary, Results, Runtime, Settings, Speedup, StageRow)
from benchmarks.stats import summarize
from benchmarks.streams import (discover_images, images_from_split_csv, label_mapper, prevalence_stream,
                                split_pools)

REPO = Path(__file__).resolve().parent.parent
TFLITE_RUNTIMES = ("litert", "tflite-runtime")
RUNTIMES = TFLITE_RUNTIMES + ("keras",)
RUNTIME_MODULES = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
RUNTIME_DISTS = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}


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


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Workers:
    """Runs benchmarks.worker in fresh processes; specs and results go through files in a temp folder."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.count = 0
        self.env = dict(os.environ)
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH")) if p)

    def run(self, spec: dict) -> dict:
        self.count += 1
        spec_file = self.tmp / f"spec{self.count}.json"
        result_file = self.tmp / f"result{self.count}.json"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [sys.executable, "-m", "benchmarks.worker", "--spec", f"@{spec_file}", "--result", str(result_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=self.env)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"worker timed out after {self.timeout:.0f} s"}
        if result_file.is_file():
            return json.loads(result_file.read_text(encoding="utf-8"))
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"status": "error", "reason": f"worker exited {proc.returncode} without a result: " + " | ".join(tail)}

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def runtime_availability(requested: list[str], keras_run: Path | None, keras_reason: str) -> dict[str, Runtime]:
    """Which requested runtimes can run here, with versions or the reason they cannot (nothing imported)."""
    from importlib import metadata

    out = {}
    for name in requested:
        if name in TFLITE_RUNTIMES:
            if importlib.util.find_spec(RUNTIME_MODULES[name]) is None:
                out[name] = {"status": "not installed",
                             "reason": f"python module {RUNTIME_MODULES[name]} not found "
                                       f"(pip install {RUNTIME_DISTS[name]})"}
                continue
            try:
                version = metadata.version(RUNTIME_DISTS[name])
            except metadata.PackageNotFoundError:
                version = "?"
            out[name] = {"status": "ok", "version": version}
        else:
            missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
            if missing:
                out[name] = {"status": "not installed", "reason": f"{', '.join(missing)} not installed"}
            elif keras_run is None:
                out[name] = {"status": "skipped", "reason": keras_reason}
            else:
                try:
                    version = metadata.version("keras")
                except metadata.PackageNotFoundError:
                    version = "?"
                out[name] = {"status": "ok", "version": version, "run": str(keras_run)}
    return out


def find_keras_run(arg: str | None, source_run: str | None) -> tuple[Path | None, str]:
    """The training run whose stageN.keras files are the notebook-path baseline, or (None, why not)."""
    candidate = arg or source_run
    where = "--keras-run" if arg else "the manifest's source_run"
    if not candidate:
        return None, "no --keras-run given and the manifest has no source_run"
    run = Path(candidate)
    missing = [f for f in ("stage1.keras", "stage2.keras") if not (run / f).is_file()]
    if missing:
        return None, f"{where} {candidate}: {', '.join(missing)} not found"
    return run.resolve(), ""


def collect_images(args, source_run: str | None, clean_label: str) -> dict:
    """Labelled images for the end-to-end streams, from --images or the source run's split.csv: the Images
    entry of results.json, plus "pools" (clean, defective) for the streams."""
    if args.images:
        mapper, how = label_mapper()
        items, unmapped = discover_images(args.images, mapper)
        source = f"{args.images} (labels: {how})"
    else:
        split_csv = Path(source_run) / "split.csv" if source_run else None
        if not split_csv or not split_csv.is_file():
            return {"status": "skipped", "reason": "no --images given and the bundle's source run has no split.csv"}
        items, unmapped = images_from_split_csv(split_csv), {}
        source = f"{split_csv} (test split)"
    clean, defective = split_pools(items, clean_label)
    info = {"status": "ok", "source": source, "clean": len(clean), "defective": len(defective),
            "unmapped_folders": unmapped, "pools": (clean, defective)}
    if not items:
        info.update(status="skipped", reason=f"no labelled images found in {source}")
    return info


def stage_row(stage: int, variant: str, runtime: str, threads: int, model: Path, result: dict) -> StageRow:
    """The results.json row of one `stage` worker result."""
    row = StageRow(stage=stage, variant=variant, runtime=runtime, threads=threads, model=str(model),
                   model_mb=model.stat().st_size / 1e6 if model.is_file() else None, status=result["status"])
    if result["status"] != "ok":
        row["reason"] = result.get("reason", "")
        return row
    lat = result["latencies_ms"]
    row.update({k: result[k] for k in ("runtime_version", "import_ms", "init_ms", "first_ms", "warmup_runs",
                                       "rss_after_import_mb", "rss_after_init_mb", "peak_rss_mb", "input")})
    row["warmup_mean_ms"] = result.get("warmup_mean_ms")
    row["cpu_per_wall"] = result.get("cpu_per_wall")
    row["cpu_ms_per_run"] = result.get("cpu_ms_per_run")
    row["load_average"] = result.get("load_average")
    row["latency"] = summarize(lat)
    row["latencies_ms"] = lat
    if "macs" in result:
        row["macs"] = result["macs"]
    return row


def add_roofline(rows: list[StageRow], machine: Machine) -> None:
    """GMAC per inference (TFLite graph; Keras rows borrow their stage's float32 count) and GMAC/s."""
    by_stage = {}
    for r in rows:
        if r.get("macs"):
            by_stage.setdefault(r["stage"], {})[r["variant"]] = r["macs"]["gmac"]
    for r in rows:
        if r["status"] != "ok":
            continue
        counts = by_stage.get(r["stage"], {})
        gmac = r["macs"]["gmac"] if r.get("macs") else counts.get("float32", next(iter(counts.values()), None))
        if gmac is None:
            continue
        r["gmac"] = gmac
        r["achieved_gmacs"] = gmac / (r["latency"]["mean_ms"] / 1e3)
        precision = "int8" if r["variant"] == "int8" else "fp32"
        peak = nominal_peak(machine, r["threads"], precision)
        if peak:
            r["peak_gmacs_estimate"] = peak
            r["pct_of_peak_estimate"] = 100.0 * r["achieved_gmacs"] / peak


def speedups(rows: list[StageRow]) -> list[Speedup]:
    """Ratios of mean latencies measured in this run: every config vs Keras, and int8 vs float32."""
    ok = {(r["stage"], r["runtime"], r["variant"], r["threads"]): r["latency"]["mean_ms"]
          for r in rows if r["status"] == "ok"}
    out = []
    for (stage, runtime, variant, threads), mean in sorted(ok.items()):
        keras = ok.get((stage, "keras", "float32", threads))
        if runtime != "keras" and keras:
            out.append(Speedup(stage=stage, threads=threads, config=f"{runtime} {variant}",
                               baseline="keras float32 model.predict", speedup=keras / mean))
        fp32 = ok.get((stage, runtime, "float32", threads))
        if runtime != "keras" and variant != "float32" and fp32:
            out.append(Speedup(stage=stage, threads=threads, config=f"{runtime} {variant}",
                               baseline=f"{runtime} float32", speedup=fp32 / mean))
    return out


def pipeline_summary(result: dict, prevalences: list[float], invoke_means: dict | None) -> list[PrevalenceSummary]:
    """Per-prevalence numbers of one pipeline worker; `invoke_means` = raw stage invokes for the model check."""
    out = []
    for p in prevalences:
        data = result["prevalences"].get(str(p))
        if not data or not data["records"]:
            continue
        recs = data["records"]
        lat = [r["latency_ms"] for r in recs]
        flagged = [r["flagged"] for r in recs]
        defective = [r for r in recs if r["defective"]]
        clean = [r for r in recs if not r["defective"]]
        s2 = [r["stage2_ms"] for r in recs if r["stage2_ms"] is not None]
        clean_path = [r["latency_ms"] for r in recs if not r["flagged"]]
        flagged_path = [r["latency_ms"] for r in recs if r["flagged"]]
        row = PrevalenceSummary(
            prevalence=p, images=len(recs), failures=data.get("failures", []),
            defective_fraction=len(defective) / len(recs), flagged_fraction=sum(flagged) / len(recs),
            gate_recall=(sum(r["flagged"] for r in defective) / len(defective)) if defective else None,
            gate_fpr=(sum(r["flagged"] for r in clean) / len(clean)) if clean else None,
            latency=summarize(lat), latencies_ms=lat,
            preprocess_ms=sum(r["preprocess_ms"] for r in recs) / len(recs),
            stage1_ms=sum(r["stage1_ms"] for r in recs) / len(recs),
            stage2_ms=(sum(s2) / len(s2)) if s2 else None,
            # per-image latency when Stage 1 stops the image (clean path) and when Stage 2 runs too
            clean_path_ms=(sum(clean_path) / len(clean_path)) if clean_path else None,
            flagged_path_ms=(sum(flagged_path) / len(flagged_path)) if flagged_path else None,
            stream_throughput_ips=len(recs) / data["wall_s"] if data["wall_s"] > 0 else None,
            cpu_per_wall=data.get("cpu_per_wall"), load_average=data.get("load_average"),
            # CPU time per image: with 1 thread, about the latency on an otherwise idle core
            cpu_ms_per_image=(data["cpu_per_wall"] * data["wall_s"] * 1e3 / len(recs))
            if data.get("cpu_per_wall") is not None else None)
        if invoke_means:
            row["cost_model_ms"] = costmodel.two_stage_ms(row["preprocess_ms"], invoke_means[1], invoke_means[2],
                                                          row["flagged_fraction"])
        out.append(row)
    return out


def same_work(stage_rows: list[StageRow], runtime: str, variant: str) -> dict | None:
    """{"gmac": ..., "note": ...} when Stage 1 and Stage 2 of this runtime and variant do the same work (the
    same graph MACs, to 0.5 %: a format-/1 Stage 1's one-unit output layer vs Stage 2's 7-way one is far less),
    else None: a smaller input or a lighter backbone in Stage 1 is not the same work."""
    gmac = {r["stage"]: r["gmac"] for r in stage_rows
            if r.get("gmac") and r["variant"] == variant and r["runtime"] == runtime}
    if len(gmac) != 2 or abs(gmac[1] - gmac[2]) > 0.005 * gmac[2]:
        return None
    return {"gmac": gmac[1], "note": (
        f"Stage 1 and Stage 2 do the same work ({gmac[1]:.3f} and {gmac[2]:.3f} GMAC): the gate costs one full "
        "model invoke on every image and never pays; a break-even near 0 is timing noise")}


def gate_rates(gate_costs: list[GateCost]) -> dict[tuple[str, str, int], tuple[float, float, str]]:
    """(runtime, variant, threads) -> (recall, fpr, where from) of every gate measured in this run."""
    return {(g["runtime"], g["variant"], g["threads"]): (g["recall"], g["fpr"],
            f"measured on {g['images']} labelled images ({g['defective']} defective, {g['clean']} clean) at "
            f"threshold {g['threshold']:g}") for g in gate_costs if g["status"] == "ok"}


def build_cost_models(paired_runs: list[PairedRun], pipe_runs: list[PipelineRun], light_gate: LightGate,
                      prevalences: list[float], stage_rows: list[StageRow] = (),
                      gate_costs: list[GateCost] = ()) -> list[CostModel]:
    """Two-stage vs one model per (runtime, variant, threads), from medians of the paired invokes (Stage 1,
    Stage 2 and the light gate timed in turn in one process) and the measured preprocessing; the bundle's gate
    as measured in this run (gate_costs: its recall and false-positive rate) or, where it was not, a perfect
    gate (said so in the entry). The light gate's accuracy is never measured: its curve assumes a perfect gate."""
    rates = gate_rates(list(gate_costs))
    pre_by_threads = {}
    for run in pipe_runs:
        for row in run.get("summary", []):
            pre_by_threads.setdefault(run["threads"], []).append(row["preprocess_ms"])
    grid = sorted(set([i / 100 for i in range(0, 101, 5)] + list(prevalences)))
    models = []
    for run in paired_runs:
        if run["status"] != "ok":
            continue
        runtime, variant, threads = run["runtime"], run["variant"], run["threads"]
        gate, s2 = run["latency"]["stage1"]["p50_ms"], run["latency"]["stage2"]["p50_ms"]
        pre_list = pre_by_threads.get(threads)
        pre = sum(pre_list) / len(pre_list) if pre_list else 0.0
        recall, fpr, source = rates.get((runtime, variant, threads), (1.0, 0.0, None))
        entry = CostModel(runtime=runtime, variant=variant, threads=threads, preprocess_ms=pre,
                          preprocess_measured=bool(pre_list), gate_ms=gate, stage2_ms=s2, single_ms=s2,
                          estimator="median of paired invokes", rounds=run["rounds"],
                          break_even=costmodel.break_even(gate, s2, s2, recall, fpr),
                          curve=costmodel.curve(pre, gate, s2, s2, grid, recall, fpr))
        if source:
            entry.update(gate_recall=recall, gate_fpr=fpr, gate_source=source)
        same = same_work(list(stage_rows), runtime, variant)
        if same:
            # The same work twice: the gate costs a full Stage-2 invoke, so it can never pay; a small positive
            # break-even here is the timing difference between two identical graphs.
            entry["same_network"] = same
        if "light_gate" in run["latency"]:
            lg = run["latency"]["light_gate"]["p50_ms"]
            entry["light_gate"] = {"gate_ms": lg, "source": light_gate["source"],
                                   "break_even": costmodel.break_even(lg, s2, s2),
                                   "curve": costmodel.curve(pre, lg, s2, s2, grid)}
        for prun in pipe_runs:
            if (prun["runtime"], prun["variant"], prun["threads"]) == (runtime, variant, threads) \
                    and prun.get("summary"):
                entry["measured"] = [{"prevalence": r["prevalence"], "flagged_fraction": r["flagged_fraction"],
                                      "mean_ms": r["latency"]["mean_ms"], "cost_model_ms": r.get("cost_model_ms")}
                                     for r in prun["summary"]]
        models.append(entry)
    return models


def gate_cost(variant: str, runtime: str, threads: int, result: dict, prevalences: list[float]) -> GateCost:
    """The two-stage bundle against one 8-class model of Stage-2 size, at each prevalence, with the gate as it
    behaved on the labelled images (a `gate` worker's records). Every term is a median over those images in one
    process; the formulas are benchmarks/costmodel.py's:
        two-stage  = (decode + resize1) + Stage 1 + flagged(p) x (resize2 + Stage 2)
        one model  = (decode + resize to Stage 2's input) + Stage 2
        flagged(p) = p x recall + (1 - p) x fpr"""
    from statistics import median

    entry = GateCost(variant=variant, runtime=runtime, threads=threads, status=result["status"])
    if result["status"] != "ok":
        entry["reason"] = result.get("reason", "")
        return entry
    recs = result["records"]
    defective = [r for r in recs if r["defective"]]
    clean = [r for r in recs if not r["defective"]]
    entry.update(runtime_version=result["runtime_version"], threshold=result["threshold"], sizes=result["sizes"],
                 images=len(recs), clean=len(clean), defective=len(defective), failures=result["failures"])
    if not defective or not clean:
        entry.update(status="skipped", reason=f"needs clean and defective images to measure the gate "
                                              f"({len(clean)} clean, {len(defective)} defective scored)")
        return entry
    recall = sum(r["flagged"] for r in defective) / len(defective)
    fpr = sum(r["flagged"] for r in clean) / len(clean)
    med = {k: median(r[f"{k}_ms"] for r in recs) for k in ("decode", "resize1", "stage1", "stage2")}
    resize2 = [r["resize2_ms"] for r in recs if r["resize2_ms"] is not None]
    med["resize2"] = median(resize2) if resize2 else None
    pre = med["decode"] + med["resize1"]
    stage2 = (med["resize2"] or 0.0) + med["stage2"]
    single_pre = med["decode"] + (med["resize1"] if med["resize2"] is None else med["resize2"])
    single = costmodel.single_model_ms(single_pre, med["stage2"])
    rows = []
    for p in prevalences:
        two = costmodel.two_stage_ms(pre, med["stage1"], stage2, p, recall, fpr)
        rows.append({"prevalence": p, "flagged_fraction": costmodel.flagged_fraction(p, recall, fpr),
                     "two_stage_ms": two, "single_ms": single, "ratio": two / single})
    entry.update(recall=recall, fpr=fpr, medians_ms=med, preprocess_ms=pre, stage1_ms=med["stage1"],
                 stage2_ms=stage2, single_preprocess_ms=single_pre, single_model_ms=med["stage2"], rows=rows,
                 # the preprocessing differs between the two (Stage-1 vs Stage-2 resize): folded into each side
                 break_even=costmodel.break_even(pre + med["stage1"], stage2, single, recall, fpr))
    return entry


def light_gate_models(args, bundle, out: Path, workers: Workers, tflite_rt: str | None) -> LightGate:
    """Where the lightweight gate's latency comes from: the bundle itself, a given file, or a built one."""
    backbone = bundle.backbones.get("stage1")
    if args.light_gate == "off":
        return {"status": "skipped", "reason": "--light-gate off"}
    if args.light_gate == "auto" and backbone == "mobilenet_v3_small":
        return {"status": "ok", "source": "measured: the bundle's Stage 1 is mobilenet_v3_small", "from_bundle": True}
    if tflite_rt is None:
        return {"status": "skipped", "reason": "no TFLite runtime installed"}
    if args.light_gate != "auto":
        path = Path(args.light_gate)
        if not path.is_file():
            return {"status": "error", "reason": f"--light-gate {path}: no such file"}
        return {"status": "ok", "source": f"measured: {path}", "model": str(path.resolve())}
    if importlib.util.find_spec("tensorflow") is None:
        return {"status": "skipped", "reason": "TensorFlow not installed: cannot build a MobileNetV3Small gate"}
    size = bundle.image_sizes[1][0]           # a light gate in place of Stage 1, at Stage 1's input size
    log(f"building a random-weight MobileNetV3Small Stage 1 at {size}x{size} (int8) for the light-gate estimate")
    res = workers.run({"mode": "build-gate", "image_size": size,
                       "out": str(out / "light_gate" / "stage1_mobilenet_v3_small_int8.tflite")})
    if res["status"] != "ok":
        return {"status": "error", "reason": res.get("reason", "")}
    return {"status": "ok", "model": res["model"],
            "source": "ESTIMATE: random-weight MobileNetV3Small exported int8 the same way (latency only; "
                      "weights do not change speed)"}


class SetupError(Exception):
    """The run cannot start (bad bundle, variants, --out or --images): exit 2 with the message."""


class Benchmark:
    """One `python -m benchmarks` run: set up from the arguments, then the five measurement passes (stages,
    light gate, paired, end to end, the gate on labelled images), each worker in a fresh process, results.json
    saved after every measurement."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None):
        from edge_runtime.bundle import BundleError, load_bundle

        self.args = args
        try:
            self.bundle = load_bundle(args.models)   # refuses a damaged bundle (sha256) before anything is timed
        except BundleError as exc:
            raise SetupError(str(exc)) from None
        self.variants = args.variants or list(self.bundle.variants)
        missing = [v for v in self.variants if v not in self.bundle.variants]
        if missing:
            raise SetupError(f"--variants {missing} not in the bundle (has {list(self.bundle.variants)})")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or f"reports/bench-{stamp}")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(f"cannot create --out {self.out}: {exc.strerror or exc}") from None
        self.machine = describe_machine()
        self.keras_run, keras_reason = find_keras_run(args.keras_run, self.bundle.source_run)
        self.runtimes = runtime_availability(args.runtime, self.keras_run, keras_reason)
        log(f"machine: {self.machine['cpu_model']}, {self.machine['cores']} cores, {self.machine['architecture']}, "
            f"load {self.machine['load_average_at_start']}")
        for name, info in self.runtimes.items():
            log(f"runtime {name}: {info['status']}" + (f" {info['version']}" if info.get("version") else "")
                + (f" ({info['reason']})" if info.get("reason") else ""))
        self.tflite_rts = [r for r in args.runtime if r in TFLITE_RUNTIMES and self.runtimes[r]["status"] == "ok"]
        self.use_keras = "keras" in self.runtimes and self.runtimes["keras"]["status"] == "ok"
        self.images, self.streams = self._streams()
        self.results = self._skeleton(argv)
        self.failures = 0
        self._step = 0
        self._total = 0

    def _streams(self) -> tuple[Images, dict[str, list]]:
        args = self.args
        try:
            images = collect_images(args, self.bundle.source_run, self.bundle.clean_label)
        except (FileNotFoundError, OSError, KeyError) as exc:   # a wrong --images folder or a malformed split.csv
            raise SetupError(str(exc)) from None
        streams = {}
        pools = images.pop("pools", None)
        self.labelled = []                  # every labelled image, for the gate's measured recall and fpr
        if images["status"] == "ok":
            clean, defective = pools
            self.labelled = [list(it) for it in clean + defective]
            if args.gate_images and len(self.labelled) > args.gate_images:   # evenly spread: both pools stay in
                n = args.gate_images
                self.labelled = [self.labelled[i * len(self.labelled) // n] for i in range(n)]
            for p in args.prevalence:
                try:
                    streams[str(p)] = [list(it) for it in prevalence_stream(clean, defective, p, args.stream_length,
                                                                            seed=args.seed)]
                except ValueError as exc:
                    images.setdefault("skipped_prevalences", {})[str(p)] = str(exc)
            log(f"images: {images['clean']} clean, {images['defective']} defective from {images['source']}"
                + (f"; unmapped folders ignored: {images['unmapped_folders']}" if images["unmapped_folders"] else ""))
        else:
            log(f"end-to-end: skipped ({images['reason']})")
        return images, streams

    def _skeleton(self, argv) -> Results:
        args, bundle = self.args, self.bundle
        settings = Settings(bundle=str(bundle.root), variants=self.variants, threads=args.threads,
                            runtimes=args.runtime, prevalences=args.prevalence, runs=args.runs,
                            max_seconds=args.max_seconds, stream_length=args.stream_length, images=args.images,
                            keras_run=str(self.keras_run) if self.keras_run else None, seed=args.seed,
                            gate_images=args.gate_images,
                            command=" ".join(["python -m benchmarks"] + (argv or sys.argv[1:])))
        info = BundleInfo(path=str(bundle.root), image_size=list(bundle.image_size), backbones=bundle.backbones,
                          variants=list(bundle.variants), stage1_threshold=bundle.stage1_threshold,
                          stage2_classes=list(bundle.stage2_classes), source_run=bundle.source_run,
                          format=bundle.format, image_sizes={str(n): list(hw) for n, hw in bundle.image_sizes.items()},
                          stage_classes={str(n): list(c) for n, c in bundle.stage_classes.items()})
        return Results(format=FORMAT, machine=self.machine, settings=settings, bundle=info, runtimes=self.runtimes,
                       images=self.images, stages=[], pipeline=[], notes=[])

    # -- the plan ---------------------------------------------------------------------------------------
    def _stage_jobs(self) -> list[tuple[int, str, str, int, Path]]:
        jobs = []
        for threads in self.args.threads:
            for stage in (1, 2):
                for rt in self.tflite_rts:
                    for variant in self.variants:
                        jobs.append((stage, variant, rt, threads, self.bundle.stage(stage, variant).path))
                if self.use_keras:
                    jobs.append((stage, "float32", "keras", threads, self.keras_run / f"stage{stage}.keras"))
        return jobs

    def _pipeline_jobs(self) -> list[tuple[str, str, int]]:
        jobs = []
        if self.streams:
            for threads in self.args.threads:
                jobs += [(variant, rt, threads) for rt in self.tflite_rts for variant in self.variants]
                if self.use_keras:
                    jobs.append(("float32", "keras", threads))
        return jobs

    def _gate_jobs(self) -> list[tuple[str, str, int]]:
        if not self.labelled:
            return []
        return [(variant, rt, threads) for threads in self.args.threads for rt in self.tflite_rts
                for variant in self.variants]

    def _paired_jobs(self) -> list[tuple[str, str, int]]:
        return [(variant, rt, threads) for threads in self.args.threads for rt in self.tflite_rts
                for variant in self.variants]

    def _gate_planned(self) -> bool:
        light = self.args.light_gate
        return bool(self.tflite_rts) and (
            (light not in ("off", "auto") and Path(light).is_file())
            or (light == "auto" and self.bundle.backbones.get("stage1") != "mobilenet_v3_small"
                and importlib.util.find_spec("tensorflow") is not None))

    def _progress(self, what: str) -> None:
        self._step += 1
        log(f"[{self._step}/{self._total}] {what}")

    def _save(self) -> None:
        """results.json after every measurement: an interrupted run keeps what it measured."""
        report.write_json(self.out / "results.json", self.results)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> int:
        stage_jobs, paired_jobs, pipe_jobs = self._stage_jobs(), self._paired_jobs(), self._pipeline_jobs()
        gate_jobs = self._gate_jobs()
        self._total = (len(stage_jobs) + len(paired_jobs) + len(pipe_jobs) + len(gate_jobs)
                       + (len(self.args.threads) if self._gate_planned() else 0))
        workers = Workers(self.args.timeout)
        t_start = time.perf_counter()
        try:
            self._measure_stages(workers, stage_jobs)
            gate = self._measure_light_gate(workers)
            self._measure_paired(workers, paired_jobs, gate)
            self._measure_pipelines(workers, pipe_jobs)
            self._measure_gates(workers, gate_jobs)
            self.results["cost_models"] = build_cost_models(self.results.get("paired", []), self.results["pipeline"],
                                                            gate, self.args.prevalence, self.results["stages"],
                                                            self.results.get("gate_costs", []))
        finally:
            workers.close()
        self.results["elapsed_s"] = time.perf_counter() - t_start
        self.results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        paths = report.write_all(self.out, self.results)
        log(f"done in {self.results['elapsed_s']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
        return 1 if self.failures else 0

    def _measure_stages(self, workers: Workers, jobs) -> None:
        """1. each stage, variant, runtime and thread count alone in a fresh process."""
        for stage, variant, rt, threads, path in jobs:
            self._progress(f"stage{stage} {variant} {rt} threads={threads} ...")
            res = workers.run({"mode": "stage", "runtime": rt, "model": str(path), "threads": threads,
                               "runs": self.args.runs, "max_seconds": self.args.max_seconds})
            row = stage_row(stage, variant, rt, threads, path, res)
            self.results["stages"].append(row)
            if row["status"] == "ok":
                s = row["latency"]
                log(f"    init {row['init_ms']:.1f} ms, first {row['first_ms']:.1f} ms, mean {s['mean_ms']:.2f} ms "
                    f"p99 {s['p99_ms']:.2f} ms ({s['count']} runs, {s['throughput_ips']:.1f} img/s), "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB, CPU/wall {row['cpu_per_wall'] or 0:.2f}")
            else:
                self.failures += row["status"] == "error"
                log(f"    {row['status']}: {row.get('reason', '')}")
            self._save()
        add_roofline(self.results["stages"], self.machine)
        self.results["speedups"] = speedups(self.results["stages"])

    def _measure_light_gate(self, workers: Workers) -> LightGate:
        """2. the lightweight gate, alone, at each thread count."""
        gate = light_gate_models(self.args, self.bundle, self.out, workers,
                                 self.tflite_rts[0] if self.tflite_rts else None)
        if gate["status"] == "ok" and not gate.get("from_bundle"):
            rt, gate["rows"] = self.tflite_rts[0], []
            for threads in self.args.threads:
                self._progress(f"light gate {Path(gate['model']).name} {rt} threads={threads} ...")
                res = workers.run({"mode": "stage", "runtime": rt, "model": gate["model"], "threads": threads,
                                   "runs": self.args.runs, "max_seconds": self.args.max_seconds})
                row = stage_row(1, "int8", rt, threads, Path(gate["model"]), res)
                gate["rows"].append(row)
                log(f"    mean {row['latency']['mean_ms']:.2f} ms" if row["status"] == "ok"
                    else f"    {row['status']}: {row.get('reason', '')}")
            add_roofline(gate["rows"], self.machine)
        elif gate["status"] != "ok":
            self.failures += gate["status"] == "error"
            log(f"light gate: {gate['status']} ({gate.get('reason', '')})")
        self.results["light_gate"] = gate
        return gate

    def _measure_paired(self, workers: Workers, jobs, gate: LightGate) -> None:
        """3. Stage 1, Stage 2 (and the light gate, next to int8) in turn in one process: the cost model's ratios."""
        for variant, rt, threads in jobs:
            models = {"stage1": str(self.bundle.stage(1, variant).path),
                      "stage2": str(self.bundle.stage(2, variant).path)}
            if gate["status"] == "ok" and not gate.get("from_bundle") and variant == "int8":
                models["light_gate"] = gate["model"]
            self._progress(f"paired {'/'.join(models)} {variant} {rt} threads={threads} ...")
            res = workers.run({"mode": "paired", "runtime": rt, "threads": threads, "models": models,
                               "runs": self.args.runs, "max_seconds": self.args.max_seconds})
            run = PairedRun(variant=variant, runtime=rt, threads=threads, status=res["status"])
            if res["status"] == "ok":
                run.update(rounds=res["rounds"], load_average=res["load_average"],
                           latency={k: summarize(v) for k, v in res["latencies_ms"].items()})
                log("    medians " + ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in run["latency"].items()))
            else:
                self.failures += res["status"] == "error"
                run["reason"] = res.get("reason", "")
                log(f"    {res['status']}: {run['reason']}")
            self.results.setdefault("paired", []).append(run)

    def _measure_pipelines(self, workers: Workers, jobs) -> None:
        """4. end to end through the Inspector (or the Keras notebook path) on the prevalence streams."""
        invoke_means = {}
        for r in self.results["stages"]:
            if r["status"] == "ok":
                invoke_means.setdefault((r["runtime"], r["variant"], r["threads"]), {})[r["stage"]] = \
                    r["latency"]["mean_ms"]
        bundle = self.bundle
        for variant, rt, threads in jobs:
            self._progress(f"end to end {variant} {rt} threads={threads}: "
                           f"{len(self.streams)} streams x {self.args.stream_length} images ...")
            spec = {"mode": "pipeline", "runtime": rt, "variant": variant, "threads": threads,
                    "bundle": str(bundle.root), "streams": self.streams, "max_seconds": self.args.max_seconds,
                    "clean_label": bundle.clean_label, "keras_run": str(self.keras_run) if self.keras_run else None,
                    "image_sizes": {str(n): list(hw) for n, hw in bundle.image_sizes.items()},
                    "stage1_classes": list(bundle.stage_classes[1]), "stage1_threshold": bundle.stage1_threshold}
            res = workers.run(spec)
            run = PipelineRun(variant=variant, runtime=rt, threads=threads, status=res["status"])
            if res["status"] == "ok":
                means = invoke_means.get((rt, variant, threads))
                run.update({k: res[k] for k in ("runtime_version", "init_ms", "rss_after_import_mb",
                                                "rss_after_init_mb", "peak_rss_mb")})
                run["summary"] = pipeline_summary(res, self.args.prevalence,
                                                  means if means and len(means) == 2 else None)
                for row in run["summary"]:
                    log(f"    prevalence {row['prevalence']:.2f}: {row['latency']['mean_ms']:.2f} ms/img mean, "
                        f"{row['stream_throughput_ips']:.1f} img/s, flagged {100 * row['flagged_fraction']:.0f}%")
            else:
                self.failures += res["status"] == "error"
                run["reason"] = res.get("reason", "")
                log(f"    {res['status']}: {run['reason']}")
            self.results["pipeline"].append(run)
            self._save()


    def _measure_gates(self, workers: Workers, jobs) -> None:
        """5. the bundle's gate on every labelled image (both stages timed on each): its real recall and false
        positive rate, and the two-stage vs one-model table at each prevalence."""
        for variant, rt, threads in jobs:
            self._progress(f"gate {variant} {rt} threads={threads}: {len(self.labelled)} labelled images, "
                           "both stages on each ...")
            res = workers.run({"mode": "gate", "runtime": rt, "variant": variant, "threads": threads,
                               "bundle": str(self.bundle.root), "items": self.labelled})
            entry = gate_cost(variant, rt, threads, res, self.args.prevalence)
            if entry["status"] == "ok":
                log(f"    recall {entry['recall']:.3f}, clean FPR {entry['fpr']:.3f} at threshold "
                    f"{entry['threshold']:g}; " + ", ".join(
                        f"p={r['prevalence']:g}: flagged {100 * r['flagged_fraction']:.0f}%, two-stage/single "
                        f"{r['ratio']:.2f}" for r in entry["rows"]))
            else:
                self.failures += entry["status"] == "error"
                log(f"    {entry['status']}: {entry.get('reason', '')}")
            self.results.setdefault("gate_costs", []).append(entry)
            self._save()


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        bench = Benchmark(args, argv)
    except (UsageError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return bench.run()
