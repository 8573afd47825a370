"""The modes of `python -m benchmarks`, one runner each, and MODES: the table the entry point builds them from.

A runner plans its worker runs from the session (benchmarks/session.py) and `run(results)` measures them, each
in a fresh worker process, and returns its part of results.json; `results` holds the parts of the modes before
it in MODES (the pipeline reads the stage rows, the cost models read everything). Turning worker results into
rows is benchmarks/rows.py's job.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from benchmarks.rows import add_roofline, build_cost_models, gate_cost, pipeline_summary, speedups, stage_row
from benchmarks.schema import LightGate, PairedRun, PipelineRun, Results
from benchmarks.session import Session, log
from benchmarks.stats import summarize
from benchmarks.worker import Workers


class Runner:
    """One mode: planned() worker runs (for the progress count), run(results) -> its part of results.json."""

    fills: tuple[str, ...] = ()           # the results.json keys its part may hold

    def __init__(self, session: Session, workers: Workers):
        self.session, self.workers, self.args = session, workers, session.args

    def jobs(self) -> list:
        return []

    def planned(self) -> int:
        return len(self.jobs())

    def run(self, results: Results) -> dict:
        raise NotImplementedError


def errors(part: dict) -> int:
    """Entries of a runner's part that failed with an error (skipped or not installed is no failure)."""
    entries = [e for value in part.values() for e in (value if isinstance(value, list) else [value])]
    return sum(isinstance(e, dict) and e.get("status") == "error" for e in entries)


class StageRunner(Runner):
    """Each stage, variant, runtime and thread count alone in a fresh process: the TFLite variants, and the Keras
    float32 models (the notebook's model.predict path) where a training run has them. Init, first inference,
    steady-state latency, RSS, MACs; then the roofline and the speed-ups between them."""

    fills = ("stages", "speedups")

    def jobs(self) -> list[tuple[int, str, str, int, Path]]:
        s, jobs = self.session, []
        for threads in self.args.threads:
            for stage in (1, 2):
                for rt in s.tflite_rts:
                    for variant in s.variants:
                        jobs.append((stage, variant, rt, threads, s.bundle.stage(stage, variant).path))
                if s.use_keras:
                    jobs.append((stage, "float32", "keras", threads, s.keras_run / f"stage{stage}.keras"))
        return jobs

    def run(self, results: Results) -> dict:
        rows = []
        for stage, variant, rt, threads, path in self.jobs():
            self.session.progress(f"stage{stage} {variant} {rt} threads={threads} ...")
            res = self.workers.run({"mode": "stage", "runtime": rt, "model": str(path), "threads": threads,
                                    "runs": self.args.runs, "max_seconds": self.args.max_seconds})
            row = stage_row(stage, variant, rt, threads, path, res)
            rows.append(row)
            if row["status"] == "ok":
                s = row["latency"]
                log(f"    init {row['init_ms']:.1f} ms, first {row['first_ms']:.1f} ms, mean {s['mean_ms']:.2f} ms "
                    f"p99 {s['p99_ms']:.2f} ms ({s['count']} runs, {s['throughput_ips']:.1f} img/s), "
                    f"peak RSS {row['peak_rss_mb']:.0f} MB, CPU/wall {row['cpu_per_wall'] or 0:.2f}")
            else:
                log(f"    {row['status']}: {row.get('reason', '')}")
            self.session.checkpoint(results, stages=rows)
        add_roofline(rows, self.session.machine)
        return {"stages": rows, "speedups": speedups(rows)}


class LightGateRunner(Runner):
    """The lightweight gate the cost model sets beside the bundle's Stage 1, alone at each thread count: the
    bundle's own Stage 1 when it is mobilenet_v3_small, a --light-gate file, or a random-weight MobileNetV3Small
    built and exported int8 (its latency only: weights do not change speed)."""

    fills = ("light_gate",)

    def planned(self) -> int:
        light = self.args.light_gate
        built_or_given = bool(self.session.tflite_rts) and (
            (light not in ("off", "auto") and Path(light).is_file())
            or (light == "auto" and self.session.bundle.backbones.get("stage1") != "mobilenet_v3_small"
                and importlib.util.find_spec("tensorflow") is not None))
        return len(self.args.threads) if built_or_given else 0

    def run(self, results: Results) -> dict:
        gate = self.source()
        if gate["status"] == "ok" and not gate.get("from_bundle"):
            rt, gate["rows"] = self.session.tflite_rts[0], []
            for threads in self.args.threads:
                self.session.progress(f"light gate {Path(gate['model']).name} {rt} threads={threads} ...")
                res = self.workers.run({"mode": "stage", "runtime": rt, "model": gate["model"], "threads": threads,
                                        "runs": self.args.runs, "max_seconds": self.args.max_seconds})
                row = stage_row(1, "int8", rt, threads, Path(gate["model"]), res)
                gate["rows"].append(row)
                log(f"    mean {row['latency']['mean_ms']:.2f} ms" if row["status"] == "ok"
                    else f"    {row['status']}: {row.get('reason', '')}")
            add_roofline(gate["rows"], self.session.machine)
        elif gate["status"] != "ok":
            log(f"light gate: {gate['status']} ({gate.get('reason', '')})")
        return {"light_gate": gate}

    def source(self) -> LightGate:
        """Where the lightweight gate's latency comes from: the bundle itself, a given file, or a built one."""
        args, bundle = self.args, self.session.bundle
        if args.light_gate == "off":
            return {"status": "skipped", "reason": "--light-gate off"}
        if args.light_gate == "auto" and bundle.backbones.get("stage1") == "mobilenet_v3_small":
            return {"status": "ok", "source": "measured: the bundle's Stage 1 is mobilenet_v3_small",
                    "from_bundle": True}
        if not self.session.tflite_rts:
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
        res = self.workers.run({"mode": "build-gate", "image_size": size,
                                "out": str(self.session.out / "light_gate" / "stage1_mobilenet_v3_small_int8.tflite")})
        if res["status"] != "ok":
            return {"status": "error", "reason": res.get("reason", "")}
        return {"status": "ok", "model": res["model"],
                "source": "ESTIMATE: random-weight MobileNetV3Small exported int8 the same way (latency only; "
                          "weights do not change speed)"}


class PairedRunner(Runner):
    """Stage 1, Stage 2 (and the light gate, next to int8) invoked in turn in one process, per TFLite runtime,
    variant and thread count: the cost model's ratios, measured under the same load."""

    fills = ("paired",)

    def jobs(self) -> list[tuple[str, str, int]]:
        return [(variant, rt, threads) for threads in self.args.threads for rt in self.session.tflite_rts
                for variant in self.session.variants]

    def run(self, results: Results) -> dict:
        gate, bundle, runs = results["light_gate"], self.session.bundle, []
        for variant, rt, threads in self.jobs():
            models = {"stage1": str(bundle.stage(1, variant).path), "stage2": str(bundle.stage(2, variant).path)}
            if gate["status"] == "ok" and not gate.get("from_bundle") and variant == "int8":
                models["light_gate"] = gate["model"]
            self.session.progress(f"paired {'/'.join(models)} {variant} {rt} threads={threads} ...")
            res = self.workers.run({"mode": "paired", "runtime": rt, "threads": threads, "models": models,
                                    "runs": self.args.runs, "max_seconds": self.args.max_seconds})
            run = PairedRun(variant=variant, runtime=rt, threads=threads, status=res["status"])
            if res["status"] == "ok":
                run.update(rounds=res["rounds"], load_average=res["load_average"],
                           latency={k: summarize(v) for k, v in res["latencies_ms"].items()})
                log("    medians " + ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in run["latency"].items()))
            else:
                run["reason"] = res.get("reason", "")
                log(f"    {res['status']}: {run['reason']}")
            runs.append(run)
        return {"paired": runs} if runs else {}


class PipelineRunner(Runner):
    """End to end on the prevalence streams, per variant, runtime and thread count: edge_runtime's Inspector for
    a TFLite variant, the notebook's path (Keras model.predict per stage) for keras."""

    fills = ("pipeline",)

    def jobs(self) -> list[tuple[str, str, int]]:
        s, jobs = self.session, []
        if s.streams:
            for threads in self.args.threads:
                jobs += [(variant, rt, threads) for rt in s.tflite_rts for variant in s.variants]
                if s.use_keras:
                    jobs.append(("float32", "keras", threads))
        return jobs

    def run(self, results: Results) -> dict:
        invoke_means = {}            # the stages' raw invokes, for the cost-model check of each prevalence
        for r in results["stages"]:
            if r["status"] == "ok":
                invoke_means.setdefault((r["runtime"], r["variant"], r["threads"]), {})[r["stage"]] = \
                    r["latency"]["mean_ms"]
        s, bundle, runs = self.session, self.session.bundle, []
        for variant, rt, threads in self.jobs():
            s.progress(f"end to end {variant} {rt} threads={threads}: "
                       f"{len(s.streams)} streams x {self.args.stream_length} images ...")
            spec = {"mode": "pipeline", "runtime": rt, "variant": variant, "threads": threads,
                    "bundle": str(bundle.root), "streams": s.streams, "max_seconds": self.args.max_seconds,
                    "clean_label": bundle.clean_label, "keras_run": str(s.keras_run) if s.keras_run else None,
                    "image_sizes": {str(n): list(hw) for n, hw in bundle.image_sizes.items()},
                    "stage1_classes": list(bundle.stage_classes[1]), "stage1_threshold": bundle.stage1_threshold}
            res = self.workers.run(spec)
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
                run["reason"] = res.get("reason", "")
                log(f"    {res['status']}: {run['reason']}")
            runs.append(run)
            s.checkpoint(results, pipeline=runs)
        return {"pipeline": runs}


class GateCostRunner(Runner):
    """The bundle's gate on every labelled image (both stages timed on each), per TFLite runtime, variant and
    thread count: its real recall and false-positive rate, and the two-stage vs one-model table at each
    prevalence."""

    fills = ("gate_costs",)

    def jobs(self) -> list[tuple[str, str, int]]:
        if not self.session.labelled:
            return []
        return [(variant, rt, threads) for threads in self.args.threads for rt in self.session.tflite_rts
                for variant in self.session.variants]

    def run(self, results: Results) -> dict:
        s, entries = self.session, []
        for variant, rt, threads in self.jobs():
            s.progress(f"gate {variant} {rt} threads={threads}: {len(s.labelled)} labelled images, "
                       "both stages on each ...")
            res = self.workers.run({"mode": "gate", "runtime": rt, "variant": variant, "threads": threads,
                                    "bundle": str(s.bundle.root), "items": s.labelled})
            entry = gate_cost(variant, rt, threads, res, self.args.prevalence)
            if entry["status"] == "ok":
                log(f"    recall {entry['recall']:.3f}, clean FPR {entry['fpr']:.3f} at threshold "
                    f"{entry['threshold']:g}; " + ", ".join(
                        f"p={r['prevalence']:g}: flagged {100 * r['flagged_fraction']:.0f}%, two-stage/single "
                        f"{r['ratio']:.2f}" for r in entry["rows"]))
            else:
                log(f"    {entry['status']}: {entry.get('reason', '')}")
            entries.append(entry)
            s.checkpoint(results, gate_costs=entries)
        return {"gate_costs": entries} if entries else {}


class CostModelRunner(Runner):
    """No worker: the two-stage vs one-model cost per runtime, variant and thread count, from the paired medians,
    the measured preprocessing, the light gate and the gate as measured on the labelled images."""

    fills = ("cost_models",)

    def run(self, results: Results) -> dict:
        return {"cost_models": build_cost_models(results.get("paired", []), results["pipeline"],
                                                 results["light_gate"], self.args.prevalence, results["stages"],
                                                 results.get("gate_costs", []))}


# The modes in the order they run (a runner reads the parts of those before it): name -> runner factory.
MODES: dict[str, type[Runner]] = {
    "stages": StageRunner,
    "light_gate": LightGateRunner,
    "paired": PairedRunner,
    "pipeline": PipelineRunner,
    "gate_costs": GateCostRunner,
    "cost_models": CostModelRunner,
}
