"""results.json, results.md (Markdown tables) and PNG plots of one benchmark run (schema: benchmarks/schema.py)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.schema import PipelineRun, Results, StageRow, problems


def write_json(path: Path, results: Results) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if 0 < abs(value) < 1 and digits < 3:   # tiny test models: keep significant digits
            digits = 3
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def config_label(row: StageRow | PipelineRun) -> str:
    return f"{row['runtime']} {row['variant']} t{row['threads']}"


def markdown(results: Results) -> str:
    m = results["machine"]
    s = results["settings"]
    b = results["bundle"]
    out = [f"# Benchmark of `{b['path']}`", "",
           f"Date {m['date']}; command `{s['command']}`; {results.get('elapsed_s', 0):.0f} s.", ""]
    out += ["## Machine", ""]
    out += _table(["", ""], [
        ["CPU", f"{m['cpu_model']} ({_f(m['cpu_mhz'], 0)} MHz nominal)"], ["cores", m["cores"]],
        ["architecture", m["architecture"]], ["OS", m["os"]], ["Python", m["python"]],
        ["memory", _f(m["memory_gb"], 1, " GB")], ["ISA", ", ".join(m["isa_flags"]) or "–"],
        ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
        ["threads measured", ", ".join(str(t) for t in s["threads"])],
        ["load average (1/5/15 min)", f"start {m['load_average_at_start']}, end {m.get('load_average_at_end')}"]])
    out += [bundle_line(b), ""]

    out += ["## Runtimes", ""]
    out += _table(["runtime", "status", "version / reason"],
                  [[k, v["status"], v.get("version") or v.get("reason", "")] for k, v in results["runtimes"].items()])

    out += ["## Per stage", "",
            "Steady-state `invoke()` with the input set once (as LiteRT's `benchmark_model`); Keras rows are the "
            "original notebook's `model.predict` on one image. Init = interpreter construction + "
            "`allocate_tensors()` (Keras: `load_model`). Each row ran in a fresh process: RSS after init and peak "
            "RSS include the Python interpreter and the runtime's own libraries. GMAC/s = graph MACs / mean "
            "latency; % of peak is against an ESTIMATED nominal peak (see Roofline).", ""]
    rows = []
    for r in results["stages"]:
        if r["status"] != "ok":
            rows.append([r["stage"], r["runtime"], r["variant"], r["threads"], _f(r["model_mb"]),
                         r["status"] + ": " + r.get("reason", "")] + [""] * 16)
            continue
        lat = r["latency"]
        rows.append([r["stage"], r["runtime"], r["variant"], r["threads"], _f(r["model_mb"]), _f(r["init_ms"], 1),
                     _f(r["first_ms"], 1), _f(r.get("warmup_mean_ms"), 1), _f(lat["mean_ms"]), _f(lat["p50_ms"]),
                     _f(lat["p90_ms"]),
                     _f(lat["p99_ms"]), _f(lat["throughput_ips"], 1), lat["count"], _f(r["rss_after_init_mb"], 0),
                     _f(r["peak_rss_mb"], 0), _f(r.get("gmac"), 3), _f(r.get("achieved_gmacs"), 1),
                     _f(r.get("pct_of_peak_estimate"), 1, "%"), _f(r.get("cpu_ms_per_run")),
                     _f(r.get("cpu_per_wall"), 2),
                     _f((r.get("load_average") or [None])[0], 1)])
    out += _table(["stage", "runtime", "variant", "threads", "file MB", "init ms", "first ms", "warm-up ms",
                   "mean ms", "p50",
                   "p90", "p99", "img/s", "runs", "RSS init MB", "peak RSS MB", "GMAC", "GMAC/s", "% peak (est.)",
                   "CPU ms/run", "CPU/wall", "load 1m"], rows)
    out += ["CPU/wall = CPU seconds used by the benchmark process per wall-clock second while timing: about "
            "the thread count on an idle machine; well below it means other processes held the cores and the "
            "latencies above are inflated by that contention. CPU ms/run = the process's CPU time per "
            "inference: with 1 thread it approximates the latency on an otherwise idle core (with more "
            "threads it also counts worker threads' spinning).", ""]
    if results.get("speedups"):
        out += ["### Speed-ups (ratios of mean latencies measured together in this run)", ""]
        out += _table(["stage", "threads", "config", "vs", "speed-up"],
                      [[x["stage"], x["threads"], x["config"], x["baseline"], f"{x['speedup']:.2f}x"]
                       for x in results["speedups"]])

    out += ["## End to end", ""]
    img = results["images"]
    if img["status"] != "ok":
        out += [f"Skipped: {img['reason']}", ""]
    else:
        out += [f"Images: {img['source']}: {img['clean']} clean, {img['defective']} defective"
                + (f"; ignored unmapped folders {img['unmapped_folders']}" if img["unmapped_folders"] else "") + ".",
                "Each stream mixes clean and defective images at the given prevalence (sampled, shuffled, same "
                "streams for every configuration). Latency = `Inspector.inspect(path)` wall clock: decode + "
                "preprocessing + Stage 1 + Stage 2 when flagged (Keras: the same preprocessing, then "
                "`model.predict` per stage). Clean path = images Stage 1 let through as clean (Stage 1 only); "
                "flagged path = images that also ran Stage 2. `model ms` = preprocessing + raw Stage-1 invoke + "
                "flagged fraction x "
                "raw Stage-2 invoke, from the per-stage table: how well the cost model predicts the measurement.",
                ""]
        for p, reason in img.get("skipped_prevalences", {}).items():
            out += [f"- prevalence {p} skipped: {reason}"]
        rows = []
        for run in results["pipeline"]:
            if run["status"] != "ok":
                rows.append([run["runtime"], run["variant"], run["threads"], run["status"] + ": "
                             + run.get("reason", "")] + [""] * 14)
                continue
            for x in run["summary"]:
                rows.append([run["runtime"], run["variant"], run["threads"], _f(x["prevalence"]), x["images"],
                             _f(100 * x["flagged_fraction"], 0, "%"), _f(x["latency"]["mean_ms"]),
                             _f(x["latency"]["p50_ms"]), _f(x["latency"]["p99_ms"]),
                             _f(x["stream_throughput_ips"], 1), _f(x.get("clean_path_ms")),
                             _f(x.get("flagged_path_ms")), _f(x["preprocess_ms"]), _f(x.get("cost_model_ms")),
                             _f(run["peak_rss_mb"], 0), len(x["failures"]), _f(x.get("cpu_ms_per_image")),
                             _f(x.get("cpu_per_wall"), 2)])
        out += _table(["runtime", "variant", "threads", "prevalence", "images", "flagged", "mean ms", "p50", "p99",
                       "img/s", "clean-path ms", "flagged-path ms", "preproc ms", "model ms", "peak RSS MB",
                       "failed", "CPU ms/img", "CPU/wall"], rows)
        out += _e2e_speedups(results)

    out += gate_cost_section(results)
    out += ["## Gate vs one 8-class model: raw invokes and a lighter gate", "",
            "Cost model from raw model invokes (all terms measured in this run): single 8-class model = "
            "preprocessing + one Stage-2-sized invoke per image (same backbone; only the head differs: 8 vs 7 "
            "outputs); two-stage = preprocessing + Stage 1 + P(flagged) x Stage 2, P(flagged) = prevalence x "
            "recall + (1 - prevalence) x false-positive rate, with the bundle's gate as measured above where it "
            "was (else a perfect gate, recall 1 and no false positives, said so in the gate column). Stage 1, "
            "Stage 2 and the light gate are the medians of invokes taken in turn in one process (paired), so "
            "their ratio holds even when other work on the machine slows the run; preprocessing is the mean "
            "measured end to end. The light gate's accuracy is not measured (random weights): its column "
            "assumes a perfect gate.", ""]
    rows = []
    for c in results.get("cost_models", []):
        lg = c.get("light_gate")
        gate = (f"recall {c['gate_recall']:.3f}, FPR {c['gate_fpr']:.3f}" if "gate_recall" in c
                else "perfect (not measured)")
        rows.append([c["runtime"], c["variant"], c["threads"],
                     _f(c["preprocess_ms"]) + ("" if c["preprocess_measured"] else " (not measured)"),
                     _f(c["gate_ms"]), _f(c["stage2_ms"]), _f(c["preprocess_ms"] + c["single_ms"]), gate,
                     c["break_even"]["verdict"] + (" (the same work in both stages: never pays; the "
                                                   "difference is noise)" if c.get("same_network")
                                                   and c["break_even"]["pays_below"] > 0 else ""),
                     _f(lg["gate_ms"]) if lg else "–",
                     lg["break_even"]["verdict"] if lg else "–"])
    out += _table(["runtime", "variant", "threads", "preproc ms", "Stage 1 ms", "Stage 2 ms",
                   "single model ms/img", "gate", "two-stage (this bundle's gate)", "light gate ms",
                   "two-stage (light gate, perfect)"], rows)
    notes = sorted({c["same_network"]["note"] for c in results.get("cost_models", []) if c.get("same_network")})
    out += [f"- {n}." for n in notes] + ([""] if notes else [])
    gate = results.get("light_gate", {})
    out += [f"Light gate: {gate.get('source') or gate.get('status', '') + ': ' + gate.get('reason', '')}.", ""]

    out += ["## Roofline", "", f"Nominal peak: {m['peak_estimate']['note']}. Basis: {m['peak_estimate']['basis']}; "
            f"{_f(m['cpu_mhz'], 0)} MHz x min(threads, {m['cores']} cores). MACs are counted from each TFLite "
            "graph (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV); other ops are not counted:", ""]
    seen = set()
    for r in results["stages"]:
        if r.get("macs") and (r["stage"], r["variant"]) not in seen:
            seen.add((r["stage"], r["variant"]))
            mc = r["macs"]
            out.append(f"- stage{r['stage']} {r['variant']}: {mc['gmac']:.3f} GMAC ({mc['counted_ops']}); "
                       f"not counted: {mc['uncounted_ops']}")
    out += [""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def bundle_line(b: dict) -> str:
    """What the bundle is: each stage's input size and what its probabilities are over."""
    sizes = b.get("image_sizes") or {"1": b["image_size"], "2": b["image_size"]}
    classes = b.get("stage_classes") or {"1": ["defective"], "2": b["stage2_classes"]}
    backbones = b.get("backbones") or {}

    def stage(n: str) -> str:
        names = classes[n]
        what = ("P(defective), one sigmoid unit" if names == ["defective"] else
                f"{len(names)} classes" + (", P(defective) = 1 - P(clean)" if n == "1" else ""))
        return (f"Stage {n} {backbones.get(f'stage{n}') or '?'} {sizes[n][0]}x{sizes[n][1]} ({what})")

    fmt = (b.get("format") or "sem-inspect-bundle/1").rpartition("/")[2]
    return (f"Bundle (format /{fmt}): {stage('1')}; {stage('2')}; variants {', '.join(b['variants'])}, "
            f"Stage-1 threshold {b['stage1_threshold']:g}.")


def gate_cost_section(results: Results) -> list[str]:
    """The two-stage bundle vs one 8-class model of Stage-2 size, with the gate as measured on labelled images."""
    costs = results.get("gate_costs") or []
    out = ["## Two-stage vs one 8-class model, at the gate's measured recall and false-positive rate", ""]
    if not costs:
        reason = results["images"].get("reason") if results["images"]["status"] != "ok" else "no TFLite runtime ran"
        return out + [f"Not measured: {reason}.", ""]
    out += ["The bundle's own Stage 1 at its own threshold, through the runtime, on every labelled image "
            "(`--gate-images` caps them): defect recall R = defective images flagged / defective images, clean "
            "false-positive rate F = clean images flagged / clean images. Flagged fraction at prevalence p = "
            "p x R + (1 - p) x F (a perfect gate would flag exactly p). Two-stage ms = preprocess (decode + resize "
            "to Stage 1's input) + Stage 1 (backbone + head) + flagged x Stage 2 (resize to its input when it "
            "differs + backbone + head). One 8-class model of Stage-2 size ms = decode + resize to Stage 2's input "
            "+ the Stage-2 invoke (its head stands in for an 8-class one). Every term is the median over the same "
            "images in one process, Stage 1 and Stage 2 interleaved image by image, so the ratios hold when other "
            "work slows the run.", ""]
    rows, parts = [], []
    for c in costs:
        cfg = [c["runtime"], c["variant"], c["threads"]]
        if c["status"] != "ok":
            rows.append(cfg + [f"{c['status']}: {c.get('reason', '')}"] + [""] * 7)
            continue
        for r in c["rows"]:
            rows.append(cfg + [_f(c["recall"], 3), _f(c["fpr"], 3), _f(r["prevalence"]),
                               _f(100 * r["flagged_fraction"], 1, "%"), _f(r["two_stage_ms"]), _f(r["single_ms"]),
                               f"{r['ratio']:.2f}"])
        m = c["medians_ms"]
        parts.append(cfg + [f"{c['images']} ({c['defective']} def., {c['clean']} clean)", _f(c["threshold"], 4),
                            _f(m["decode"]), _f(m["resize1"]), _f(m["stage1"]), _f(m["resize2"]), _f(m["stage2"]),
                            c["break_even"]["verdict"]])
    out += _table(["runtime", "variant", "threads", "recall", "clean FPR", "prevalence", "flagged (measured gate)",
                   "two-stage ms/img", "one model ms/img", "two-stage / one model"], rows)
    if parts:
        out += ["Medians (ms) the table is computed from, and the break-even prevalence with the measured recall "
                "and false-positive rate (benchmarks/costmodel.py):", ""]
        out += _table(["runtime", "variant", "threads", "images", "threshold", "decode", "resize S1", "Stage 1",
                       "resize S2", "Stage 2", "two-stage pays"], parts)
    return out


def _e2e_speedups(results: Results) -> list[str]:
    """End-to-end mean latency of each TFLite config vs the Keras path, same threads and prevalence."""
    keras = {(r["threads"], x["prevalence"]): x["latency"]["mean_ms"]
             for r in results["pipeline"] if r["status"] == "ok" and r["runtime"] == "keras" for x in r["summary"]}
    rows = []
    for r in results["pipeline"]:
        if r["status"] != "ok" or r["runtime"] == "keras":
            continue
        for x in r["summary"]:
            k = keras.get((r["threads"], x["prevalence"]))
            if k:
                rows.append([f"{r['runtime']} {r['variant']}", r["threads"], _f(x["prevalence"]),
                             f"{k / x['latency']['mean_ms']:.2f}x"])
    if not rows:
        return []
    return ["### End-to-end speed-up vs the Keras path (same streams, same run)", ""] + \
        _table(["config", "threads", "prevalence", "speed-up"], rows)


def plots(out: Path, results: Results) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("matplotlib not installed: no plots")
        return []
    written = []
    ok = [r for r in results["stages"] if r["status"] == "ok"]
    if ok:
        stages = sorted({r["stage"] for r in ok})
        fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), squeeze=False, sharey=True)
        for ax, stage in zip(axes[0], stages):
            rows = [r for r in ok if r["stage"] == stage]
            ax.boxplot([r["latencies_ms"] for r in rows], showfliers=True)
            ax.set_xticks(range(1, len(rows) + 1), [config_label(r) for r in rows], rotation=45, ha="right",
                          fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("latency per inference, ms (log)")
            ax.set_title(f"Stage {stage}: steady-state latency")
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(out / "latency_stages.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    runs = [r for r in results["pipeline"] if r["status"] == "ok" and r["summary"]]
    if runs:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * sum(len(r["summary"]) for r in runs)), 4.5))
        data, labels = [], []
        for r in runs:
            for x in r["summary"]:
                data.append(x["latencies_ms"])
                labels.append(f"{config_label(r)} p={x['prevalence']:g}")
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("per-image latency, ms (log)")
        ax.set_title("End to end (decode + preprocessing + gated stages)")
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(out / "latency_pipeline.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    models = results.get("cost_models", [])
    if models:
        threads = sorted({c["threads"] for c in models})
        fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), squeeze=False)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, t in zip(axes[0], threads):
            for i, c in enumerate(x for x in models if x["threads"] == t):
                col = colours[i % len(colours)]
                name = f"{c['runtime']} {c['variant']}"
                xs = [p["prevalence"] for p in c["curve"]]
                ax.plot(xs, [p["two_stage_ms"] for p in c["curve"]], color=col, label=f"{name}: two-stage")
                ax.plot(xs, [p["single_model_ms"] for p in c["curve"]], color=col, ls="--",
                        label=f"{name}: single 8-class model")
                be = c["break_even"]["prevalence"]
                if be is not None and 0 < be < 1:
                    ax.axvline(be, color=col, ls=":", alpha=0.7)
                if c.get("light_gate"):
                    lg = c["light_gate"]
                    ax.plot(xs, [p["two_stage_ms"] for p in lg["curve"]], color=col, ls="-.",
                            label=f"{name}: two-stage, light gate")
                    lbe = lg["break_even"]["prevalence"]
                    if lbe is not None and 0 < lbe < 1:
                        ax.axvline(lbe, color=col, ls=":", alpha=0.4)
                        ax.annotate(f"break-even {lbe:.0%}", (lbe, ax.get_ylim()[0]), fontsize=7, color=col,
                                    rotation=90, va="bottom")
                for pt in c.get("measured", []):
                    ax.scatter([pt["prevalence"]], [pt["mean_ms"]], color=col, marker="o", zorder=3)
            ax.set_xlabel("defect prevalence (two-stage curves: the gate as measured, else a perfect gate)")
            ax.set_ylabel("ms per image")
            ax.set_title(f"Pipeline cost, {t} thread(s); dots: measured end to end")
            ax.set_xlim(0, 1)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "pipeline_cost.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_all(out: Path, results: Results) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pngs = plots(out, results)
    md = out / "results.md"
    md.write_text(markdown(results), encoding="utf-8")
    return [write_json(out / "results.json", results), md] + pngs


def main(argv=None) -> int:
    """Re-render results.md and the plots from a results.json (after editing notes, say)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("results", help="results.json written by python -m benchmarks")
    args = ap.parse_args(argv)
    path = Path(args.results)
    results = json.loads(path.read_text(encoding="utf-8"))
    results.setdefault("notes", [])
    bad = problems(results)
    if bad:
        print(f"error: {path} does not match the results schema (benchmarks/schema.py): " + "; ".join(bad[:5])
              + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""), file=sys.stderr)
        return 2
    for p in write_all(path.parent, results):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
