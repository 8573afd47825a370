"""The entries of results.json computed from worker results: stage rows with their roofline and speed-ups, the
end-to-end summary per prevalence, the gate's measured cost, and the two-stage vs one-model cost models. Pure
functions (no processes, no files); the formulas are benchmarks/costmodel.py's."""
from __future__ import annotations

from pathlib import Path

from benchmarks import costmodel
from benchmarks.machine import nominal_peak
from benchmarks.schema import (CostModel, GateCost, LightGate, Machine, PairedRun, PipelineRun, PrevalenceSummary,
                               Speedup, StageRow)
from benchmarks.stats import summarize


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

