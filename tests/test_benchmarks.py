"""`python -m benchmarks` on the tiny bundle: files written, numbers consistent, MACs exact, streams mixed right."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import costmodel
from benchmarks.cli import main
from benchmarks.machine import cpuinfo, macs_per_cycle, nominal_peak
from benchmarks.stats import summarize
from benchmarks.streams import discover_images, prevalence_stream, split_pools
from tests.support.mosquitto import needs_mosquitto
from tests.support.paths import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_images(root: Path, per_class: int = 4, size=(40, 48)) -> Path:
    """Synthetic grayscale PNGs in class folders, with folder names the config's aliases must map."""
    rng = np.random.default_rng(1)
    for folder in ("clean", "BRIDGE", "cracks"):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(d / f"img {i}.png")
    return root


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory):
    """One small benchmark run shared by the assertions below (workers are real subprocesses)."""
    tmp = tmp_path_factory.mktemp("bench")
    images = make_images(tmp / "images")
    out = tmp / "out"
    rc = main(["--models", str(tiny_bundle), "--images", str(images), "--threads", "1", "--runs", "5",
               "--max-seconds", "5", "--stream-length", "10", "--prevalence", "0.2,0.5",
               "--runtime", "litert,tflite-runtime,keras", "--light-gate", str(tiny_bundle / "stage1.tflite"),
               "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text())


def test_writes_json_markdown_and_plots(bench_run):
    rc, out, res = bench_run
    assert rc == 0
    md = (out / "results.md").read_text()
    assert "| stage | runtime | variant | threads |" in md and "## End to end" in md
    assert "## Gate vs one 8-class model" in md and res["machine"]["cpu_model"] in md
    for name in ("latency_stages.png", "latency_pipeline.png", "pipeline_cost.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    m = res["machine"]
    assert m["cores"] >= 1 and m["architecture"] and m["python"] and m["date"]
    assert "ai-edge-litert" in m["versions"]


def test_results_match_the_schema_and_the_report_refuses_others(bench_run, tmp_path):
    from benchmarks import report
    from benchmarks.schema import problems

    _, out, res = bench_run
    assert problems(res) == []
    # The check is live: a renamed key in a nested row, or a missing section, is reported with its place.
    drifted = json.loads(json.dumps(res))
    drifted["stages"][0]["p99"] = drifted["stages"][0]["latency"].pop("p99_ms")
    del drifted["bundle"]
    found = problems(drifted)
    assert "Results: missing key 'bundle'" in found
    assert any(p.startswith("Results.stages[0]: unknown key 'p99'") for p in found)
    assert "Results.stages[0].latency: missing key 'p99_ms'" in found
    (tmp_path / "results.json").write_text(json.dumps(drifted))
    assert report.main([str(tmp_path / "results.json")]) == 2
    assert not (tmp_path / "results.md").exists()


def test_report_rerenders_from_json(bench_run, tmp_path):
    from benchmarks import report

    _, out, _ = bench_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    assert report.main([str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert (tmp_path / "pipeline_cost.png").read_bytes().startswith(PNG_MAGIC)


def test_stage_numbers_positive_and_consistent(bench_run):
    _, _, res = bench_run
    rows = [r for r in res["stages"] if r["status"] == "ok"]
    assert {(r["stage"], r["variant"]) for r in rows} == {(1, "int8"), (1, "float32"), (2, "int8"), (2, "float32")}
    for r in rows:
        lat = r["latency"]
        assert lat["count"] == 5 and len(r["latencies_ms"]) == 5
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert lat["throughput_ips"] == pytest.approx(1000.0 / lat["mean_ms"], rel=1e-6)
        assert r["init_ms"] > 0 and r["first_ms"] > 0 and r["warmup_mean_ms"] > 0 and r["model_mb"] > 0
        if r["cpu_per_wall"] is not None:      # only reported for windows long enough to measure
            assert r["cpu_ms_per_run"] > 0 and 0 < r["cpu_per_wall"] <= 1.5    # one thread: at most ~1 core busy
        assert 0 < r["rss_after_import_mb"] <= r["rss_after_init_mb"] <= r["peak_rss_mb"]
        assert r["gmac"] > 0 and r["achieved_gmacs"] == pytest.approx(r["gmac"] / (lat["mean_ms"] / 1e3))
    # int8 and float32 graphs of one stage do the same multiply-accumulates
    macs = {(r["stage"], r["variant"]): r["macs"]["macs"] for r in rows}
    assert macs[(1, "int8")] == macs[(1, "float32")]
    assert any(s["baseline"] == "litert float32" for s in res["speedups"])


def test_runtimes_reported_side_by_side(bench_run):
    _, _, res = bench_run
    assert res["runtimes"]["litert"]["status"] == "ok"
    if importlib.util.find_spec("tflite_runtime") is None:
        assert res["runtimes"]["tflite-runtime"]["status"] == "not installed"
        assert not [r for r in res["stages"] if r["runtime"] == "tflite-runtime"]
    # the tiny bundle's source_run ("tests") has no stageN.keras: skipped with the reason
    assert res["runtimes"]["keras"]["status"] in ("skipped", "not installed")
    assert res["runtimes"]["keras"]["reason"]


def test_end_to_end_and_cost_model(bench_run, tiny_bundle):
    from benchmarks.streams import label_mapper
    from edge_runtime.gate import is_defective
    from edge_runtime.inspector import Inspector

    _, out, res = bench_run
    assert res["images"]["clean"] == 4 and res["images"]["defective"] == 8   # BRIDGE -> bridges via aliases
    runs = [r for r in res["pipeline"] if r["status"] == "ok"]
    assert {r["variant"] for r in runs} == {"int8", "float32"}
    # The same streams (seed 0), gated here in-process: the flagged share the workers report must be this one.
    clean, defective = split_pools(discover_images(out.parent / "images", label_mapper()[0])[0])
    for run in runs:
        inspector = Inspector(tiny_bundle, variant=run["variant"], threads=1)
        assert [x["prevalence"] for x in run["summary"]] == [0.2, 0.5]
        for x in run["summary"]:
            assert x["images"] == 10 and not x["failures"]
            assert x["defective_fraction"] == pytest.approx(x["prevalence"])
            stream = prevalence_stream(clean, defective, x["prevalence"], 10, seed=0)
            flagged = [is_defective(inspector.inspect(path).stage1_score, inspector.threshold) for path, _ in stream]
            assert x["flagged_fraction"] == pytest.approx(sum(flagged) / len(flagged))
            truly = [f for f, (_, label) in zip(flagged, stream) if label != "clean"]
            assert x["gate_recall"] == pytest.approx(sum(truly) / len(truly))
            assert 0 < x["latency"]["p50_ms"] <= x["latency"]["p99_ms"]
            assert x["preprocess_ms"] > 0 and x["stage1_ms"] > 0
            # each image's latency covers its preprocessing and Stage 1
            assert x["latency"]["mean_ms"] >= x["preprocess_ms"] + x["stage1_ms"]
    models = res["cost_models"]
    assert {(c["variant"], c["threads"]) for c in models} == {("int8", 1), ("float32", 1)}
    for c in models:
        assert c["preprocess_measured"] and c["single_ms"] == c["stage2_ms"]
        assert c["gate_ms"] > 0 and c["rounds"] == 5
        assert c["same_network"]["gmac"] > 0      # tiny_cnn in both stages: flagged as the same work
        # --light-gate FILE (an int8 model) was measured next to the int8 stages only
        assert (c["light_gate"]["gate_ms"] > 0) if c["variant"] == "int8" else ("light_gate" not in c)
        at_zero = c["curve"][0]
        assert at_zero["prevalence"] == 0
        # at prevalence 0 only the gate's false positives go on to Stage 2 (the gate as measured on the images)
        assert "gate_source" in c and 0 <= c["gate_fpr"] <= 1
        assert at_zero["two_stage_ms"] == pytest.approx(c["preprocess_ms"] + c["gate_ms"]
                                                        + c["gate_fpr"] * c["stage2_ms"])
    # the gate pass ran for each variant, on all 12 labelled images
    assert {(g["variant"], g["images"]) for g in res["gate_costs"]} == {("int8", 12), ("float32", 12)}


def test_damaged_bundle_refused(tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "stage1.tflite").write_bytes(b"\0" * 64)
    assert main(["--models", str(bundle), "--out", str(tmp_path / "out")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["--models", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert main(["--models", str(tiny_bundle), "--images", str(tmp_path / "no-such-folder"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "no-such-folder" in capsys.readouterr().err


def test_worker_broken_model_and_missing_runtime(tmp_path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    spec = {"mode": "stage", "runtime": "litert", "model": str(broken), "threads": 1, "runs": 3, "max_seconds": 1}
    result = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.worker", "--spec", json.dumps(spec), "--result", str(result)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert json.loads(result.read_text())["status"] == "error"
    if importlib.util.find_spec("tflite_runtime") is None:
        spec["runtime"] = "tflite-runtime"
        cmd[4] = json.dumps(spec)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0
        assert json.loads(result.read_text())["status"] == "not installed"


def test_mac_count_matches_hand_computed(tmp_path):
    pytest.importorskip("tensorflow")
    import keras

    from benchmarks.macs import count_macs_file
    from convert.export import export_tflite

    inputs = keras.Input((10, 12, 3))
    x = keras.layers.Conv2D(5, 3, padding="valid")(inputs)               # -> 8x10x5
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)                # -> 8x10x5
    x = keras.layers.Flatten()(x)                                         # -> 400
    outputs = keras.layers.Dense(4)(x)
    path = tmp_path / "m.tflite"
    path.write_bytes(export_tflite(keras.Model(inputs, outputs), "float32"))
    counted = count_macs_file(path)
    conv = 8 * 10 * 5 * 3 * 3 * 3          # out_H*out_W*out_C*kH*kW*in_C
    depthwise = 8 * 10 * 5 * 3 * 3         # out_H*out_W*out_C*kH*kW
    dense = 4 * 400
    assert counted["by_op"] == {"CONV_2D": conv, "DEPTHWISE_CONV_2D": depthwise, "FULLY_CONNECTED": dense}
    assert counted["macs"] == conv + depthwise + dense == 16000


def test_prevalence_stream_proportions():
    clean = [(f"c{i}", "clean") for i in range(7)]
    defective = [(f"d{i}", "cracks") for i in range(5)]
    for p in (0.0, 0.05, 0.2, 0.5, 1.0):
        stream = prevalence_stream(clean, defective, p, 40, seed=3)
        assert len(stream) == 40
        assert sum(label != "clean" for _, label in stream) == round(p * 40)
    mixed = prevalence_stream(clean, defective, 0.5, 40, seed=3)
    assert mixed == prevalence_stream(clean, defective, 0.5, 40, seed=3)         # reproducible
    assert [lab for _, lab in mixed] != sorted(lab for _, lab in mixed)         # shuffled, not blocked
    small = prevalence_stream(clean, defective, 0.5, 10, seed=0)                 # pools big enough:
    assert len({p for p, _ in small}) == 10                                      # no image drawn twice
    with pytest.raises(ValueError, match="defective"):
        prevalence_stream(clean, [], 0.2, 10)
    with pytest.raises(ValueError):
        prevalence_stream(clean, defective, 1.5, 10)


def test_discover_images_maps_folder_names(tmp_path):
    from benchmarks.streams import label_mapper

    for folder in ("CLEAN_LAYER", "BRIDGE", "Others", "mystery"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / folder / "a.png")
    (tmp_path / "BRIDGE" / "notes.txt").write_text("not an image")
    items, unmapped = discover_images(tmp_path, label_mapper()[0])
    assert sorted(lab for _, lab in items) == ["bridges", "clean", "other"]
    assert unmapped == {"mystery": 1}
    clean, defective = split_pools(items)
    assert len(clean) == 1 and len(defective) == 2


def test_cost_model_break_even():
    be = costmodel.break_even(gate_ms=10, stage2_ms=50, single_ms=50)
    assert be["prevalence"] == pytest.approx(0.8) and "pays below 80.0%" in be["verdict"]
    assert costmodel.two_stage_ms(5, 10, 50, 0.8) == pytest.approx(costmodel.single_model_ms(5, 50))
    assert costmodel.break_even(gate_ms=50, stage2_ms=50, single_ms=50)["verdict"].startswith("never pays")
    # with false positives the gate sends more images on, so it pays over a narrower range
    fp = costmodel.break_even(gate_ms=10, stage2_ms=50, single_ms=50, recall=1.0, fpr=0.1)
    assert fp["prevalence"] == pytest.approx(35 / 45)
    assert costmodel.two_stage_ms(0, 10, 50, fp["prevalence"], fpr=0.1) == pytest.approx(50)


def test_stats_and_peak_estimate():
    s = summarize(list(range(1, 101)))
    assert (s["mean_ms"], s["p50_ms"], s["p99_ms"]) == (50.5, 50.5, pytest.approx(99.01))
    assert s["throughput_ips"] == pytest.approx(1000 / 50.5)
    arm = cpuinfo("processor : 0\nBogoMIPS : 108.00\nFeatures : fp asimd asimddp\nCPU part : 0xd0b\n")
    assert "asimddp" in arm["flags"]
    per = macs_per_cycle("aarch64", arm["flags"])
    assert per["int8"] == 32
    info = {"cpu_mhz": 2400.0, "cores": 4, "peak_estimate": {"macs_per_cycle": per}}
    assert nominal_peak(info, 2, "int8") == pytest.approx(2 * 2.4 * 32)
    assert nominal_peak(info, 8, "int8") == pytest.approx(4 * 2.4 * 32)    # capped at the cores present


@pytest.mark.slow
def test_keras_notebook_path_side_by_side(tiny_bundle, tmp_path):
    """With a run's stageN.keras, the Keras model.predict path is measured in the same run and compared."""
    pytest.importorskip("tensorflow")
    import keras

    from tests.support.bundles import TINY_SIZE, TINY_STAGE2
    from train.models import build_stage_model

    run = tmp_path / "run"
    run.mkdir()
    build_stage_model(1, backbone="tiny_cnn", image_size=TINY_SIZE, num_classes=1).save(run / "stage1.keras")
    build_stage_model(2, backbone="tiny_cnn", image_size=TINY_SIZE,
                      num_classes=len(TINY_STAGE2)).save(run / "stage2.keras")
    keras.backend.clear_session()
    images = make_images(tmp_path / "images", per_class=2)
    out = tmp_path / "out"
    rc = main(["--models", str(tiny_bundle), "--images", str(images), "--threads", "1", "--runs", "3",
               "--stream-length", "4", "--prevalence", "0.5", "--runtime", "litert,keras", "--variants", "int8",
               "--keras-run", str(run), "--light-gate", "off", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["runtimes"]["keras"]["status"] == "ok"
    keras_rows = [r for r in res["stages"] if r["runtime"] == "keras"]
    assert [r["status"] for r in keras_rows] == ["ok", "ok"]
    assert all(r["gmac"] > 0 and r["latency"]["count"] == 3 for r in keras_rows)   # MACs borrowed from TFLite
    assert {s["stage"] for s in res["speedups"] if s["baseline"].startswith("keras")} == {1, 2}
    keras_pipe = [r for r in res["pipeline"] if r["runtime"] == "keras"]
    assert keras_pipe[0]["status"] == "ok" and keras_pipe[0]["summary"][0]["images"] == 4
    assert "End-to-end speed-up vs the Keras path" in (out / "results.md").read_text()


def test_gate_accounting_follows_the_threshold(tiny_bundle, tmp_path):
    """Threshold above any score: every image stops at Stage 1 (clean path, no Stage-2 time); threshold 0:
    every image goes on to Stage 2. The end-to-end numbers must say so."""
    import yaml

    images = make_images(tmp_path / "images", per_class=2)
    flagged = {}
    for threshold in (1.0, 0.0):
        bundle = tmp_path / f"bundle-{threshold}"
        shutil.copytree(tiny_bundle, bundle)
        manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
        manifest["gating"]["stage1_threshold"] = threshold
        (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        out = tmp_path / f"out-{threshold}"
        assert main(["--models", str(bundle), "--images", str(images), "--threads", "1", "--runs", "3",
                     "--variants", "int8", "--runtime", "litert", "--prevalence", "0.5", "--stream-length", "6",
                     "--light-gate", "off", "--out", str(out)]) == 0
        row = json.loads((out / "results.json").read_text())["pipeline"][0]["summary"][0]
        flagged[threshold] = row
    never, always = flagged[1.0], flagged[0.0]
    assert never["flagged_fraction"] == 0 and never["stage2_ms"] is None and never["flagged_path_ms"] is None
    assert never["clean_path_ms"] == pytest.approx(never["latency"]["mean_ms"])
    assert always["flagged_fraction"] == 1 and always["stage2_ms"] > 0 and always["clean_path_ms"] is None
    assert always["gate_recall"] == 1 and always["gate_fpr"] == 1


def test_cpu_share_needs_a_long_enough_window():
    from benchmarks.worker import MIN_CPU_WINDOW_S, cpu_share

    assert cpu_share(0.004, 0.0001) is None                 # one 4 ms scheduler tick in a 0.1 ms window
    assert cpu_share(0.5, 1.0) == 0.5
    assert cpu_share(2 * MIN_CPU_WINDOW_S, MIN_CPU_WINDOW_S) == 2.0


# ---- format /2: per-stage input sizes, heads, and the gate as it really behaves ---------------------------

def make_level_images(root: Path, per_class: int = 6, size=(40, 48)) -> Path:
    """Flat gray levels plus noise in class folders (the tiny format-/2 heads' scores move with the level); each
    class spans the whole range, so no threshold separates clean from defective: the gate is imperfect."""
    rng = np.random.default_rng(2)
    for k, folder in enumerate(("clean", "BRIDGE", "cracks")):
        d = root / folder
        d.mkdir(parents=True)
        for i, level in enumerate(np.linspace(0, 255, per_class) + 13 * k):
            pixels = np.clip(level + rng.normal(0, 20, size), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"img {i}.png")
    return root


def gate_truth(bundle: Path, images: Path) -> tuple[float, float, int]:
    """The gate's recall and false-positive rate on the labelled images, through edge_runtime in this process."""
    from benchmarks.streams import label_mapper
    from edge_runtime.gate import is_defective
    from edge_runtime.inspector import Inspector

    inspector = Inspector(bundle, threads=1)
    items, _ = discover_images(images, label_mapper()[0])
    flags = [(is_defective(inspector.inspect(path).stage1_score, inspector.threshold), label != "clean")
             for path, label in items]
    defective = [f for f, d in flags if d]
    clean = [f for f, d in flags if not d]
    return sum(defective) / len(defective), sum(clean) / len(clean), len(items)


@pytest.fixture(scope="module")
def bench_v2(tiny_bundle_v2, tmp_path_factory):
    """A benchmark run on the format-/2 tiny bundle (Stage 1 24x24 over 8 classes, Stage 2 32x32), its threshold
    moved to the middle of its scores on the labelled images so that it flags some of each."""
    import yaml

    from benchmarks.streams import label_mapper
    from edge_runtime.inspector import Inspector

    tmp = tmp_path_factory.mktemp("bench-v2")
    images = make_level_images(tmp / "images")
    bundle = tmp / "bundle"
    shutil.copytree(tiny_bundle_v2, bundle)
    inspector = Inspector(bundle, threads=1)
    scores = sorted(inspector.inspect(p).stage1_score for p, _ in discover_images(images, label_mapper()[0])[0])
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["gating"]["stage1_threshold"] = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    out = tmp / "out"
    rc = main(["--models", str(bundle), "--images", str(images), "--threads", "1", "--runs", "3", "--max-seconds", "3",
               "--stream-length", "6", "--prevalence", "0.05,0.2,0.5", "--runtime", "litert", "--light-gate", "off",
               "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text()), bundle, images


def test_format2_bundle_runs_every_path_at_each_stage_size(bench_v2):
    from benchmarks.schema import problems
    from tests.support.bundles import TAXONOMY

    rc, out, res, _, _ = bench_v2
    assert rc == 0 and problems(res) == []
    b = res["bundle"]
    assert b["format"] == "sem-inspect-bundle/2" and b["image_sizes"] == {"1": [24, 24], "2": [32, 32]}
    assert b["stage_classes"]["1"] == TAXONOMY and b["image_size"] == [32, 32]
    stages = {r["stage"]: r for r in res["stages"] if r["status"] == "ok"}
    assert stages[1]["input"]["shape"] == [1, 24, 24, 3] and stages[2]["input"]["shape"] == [1, 32, 32, 3]
    assert stages[1]["gmac"] < 0.7 * stages[2]["gmac"]             # (24/32)^2 of the work
    # the same backbone at a smaller input is not the same work: no "never pays, noise" note
    assert res["cost_models"] and not any("same_network" in c for c in res["cost_models"])
    pipe = res["pipeline"][0]
    assert pipe["status"] == "ok" and all(x["images"] == 6 and x["stage1_ms"] > 0 for x in pipe["summary"])
    md = (out / "results.md").read_text()
    assert "Stage 1 tiny_cnn 24x24 (8 classes, P(defective) = 1 - P(clean)); Stage 2 tiny_cnn 32x32" in md
    assert "same work" not in md


def test_two_stage_table_uses_the_gate_as_measured_not_a_perfect_one(bench_v2):
    _, out, res, bundle, images = bench_v2
    recall, fpr, n = gate_truth(bundle, images)
    assert 0 < fpr < 1 and 0 < recall < 1          # an imperfect gate: a perfect-gate table would differ
    assert abs(0.05 * recall + 0.95 * fpr - 0.05) > 0.1
    [g] = res["gate_costs"]
    assert g["status"] == "ok" and (g["images"], g["clean"], g["defective"]) == (n, 6, 12)
    assert (g["recall"], g["fpr"]) == (pytest.approx(recall), pytest.approx(fpr))
    assert g["sizes"] == {"1": [24, 24], "2": [32, 32]}
    m = g["medians_ms"]
    assert all(m[k] > 0 for k in ("decode", "resize1", "stage1", "resize2", "stage2"))
    pre, stage2 = m["decode"] + m["resize1"], m["resize2"] + m["stage2"]
    single = m["decode"] + m["resize2"] + m["stage2"]
    assert (g["preprocess_ms"], g["stage2_ms"]) == (pytest.approx(pre), pytest.approx(stage2))
    assert [r["prevalence"] for r in g["rows"]] == [0.05, 0.2, 0.5]
    md = (out / "results.md").read_text()
    for r in g["rows"]:
        p = r["prevalence"]
        flagged = p * recall + (1 - p) * fpr
        assert r["flagged_fraction"] == pytest.approx(flagged)
        assert r["two_stage_ms"] == pytest.approx(pre + m["stage1"] + flagged * stage2)
        assert r["single_ms"] == pytest.approx(single)
        assert r["ratio"] == pytest.approx(r["two_stage_ms"] / r["single_ms"])
        assert (f"| litert | int8 | 1 | {recall:.3f} | {fpr:.3f} | {p:.3f} | {100 * flagged:.1f}% | "
                f"{r['two_stage_ms']:.3f} | {r['single_ms']:.3f} | {r['ratio']:.2f} |") in md
    # break-even with the measured recall and fpr: where the two lines cross
    be = g["break_even"]["prevalence"]
    if be is not None and 0 < be < 1:
        assert pre + m["stage1"] + (be * recall + (1 - be) * fpr) * stage2 == pytest.approx(single)
    # the raw-invoke cost model assumes the same measured gate, and says so
    [c] = res["cost_models"]
    assert (c["gate_recall"], c["gate_fpr"]) == (pytest.approx(recall), pytest.approx(fpr))
    assert c["curve"][0]["two_stage_ms"] == pytest.approx(c["preprocess_ms"] + c["gate_ms"] + fpr * c["stage2_ms"])


def test_gate_cost_formula_on_known_records():
    """Hand-made records: the medians, the flagged fraction and the cost of each side, worked out by hand."""
    from benchmarks.rows import gate_cost

    def rec(defective, flagged, resize2=0.5):
        return {"score": 0.5, "decode_ms": 2.0, "resize1_ms": 0.25, "stage1_ms": 1.0, "resize2_ms": resize2,
                "stage2_ms": 8.0, "defective": defective, "flagged": flagged}

    # 4 defective (3 flagged: recall 0.75), 5 clean (1 flagged: fpr 0.2)
    records = [rec(True, True)] * 3 + [rec(True, False)] + [rec(False, True)] + [rec(False, False)] * 4
    result = {"status": "ok", "runtime_version": "x", "threshold": 0.4, "sizes": {"1": [8, 8], "2": [16, 16]},
              "records": records, "failures": []}
    g = gate_cost("int8", "litert", 1, result, [0.05, 0.5])
    assert (g["recall"], g["fpr"]) == (0.75, 0.2)
    low, half = g["rows"]
    assert low["flagged_fraction"] == pytest.approx(0.05 * 0.75 + 0.95 * 0.2)           # 0.2275, not 0.05
    assert low["two_stage_ms"] == pytest.approx(2.25 + 1.0 + 0.2275 * 8.5)               # 5.18375
    assert low["single_ms"] == half["single_ms"] == pytest.approx(2.0 + 0.5 + 8.0)
    assert half["ratio"] == pytest.approx((3.25 + 0.475 * 8.5) / 10.5)
    assert g["break_even"]["prevalence"] == pytest.approx((10.5 - 3.25 - 0.2 * 8.5) / (0.55 * 8.5))
    # one input size: Stage 2 reuses Stage 1's pixels (no second resize), the single model resizes once
    same = gate_cost("int8", "litert", 1, {**result, "records": [{**r, "resize2_ms": None} for r in records]}, [0.5])
    assert same["stage2_ms"] == 8.0 and same["single_preprocess_ms"] == pytest.approx(2.25)
    # without clean (or defective) images the gate cannot be measured: skipped with the reason
    none_clean = gate_cost("int8", "litert", 1, {**result, "records": records[:4]}, [0.5])
    assert none_clean["status"] == "skipped" and "0 clean" in none_clean["reason"]


def test_same_work_note_needs_the_same_macs():
    from benchmarks.rows import same_work

    def rows(g1, g2):
        return [{"stage": n, "gmac": g, "variant": "int8", "runtime": "litert", "status": "ok"}
                for n, g in ((1, g1), (2, g2))]

    assert same_work(rows(0.384, 0.3841), "litert", "int8")["gmac"] == 0.384      # format /1: heads differ a hair
    assert same_work(rows(0.2016, 0.384), "litert", "int8") is None                # Lite0 at 160 vs 224
    assert same_work(rows(0.384, 0.384), "litert", "float32") is None              # no rows of that variant


def test_keras_path_scores_stage1_as_the_bundle_says(tiny_bundle_v2, tmp_path, monkeypatch):
    """The notebook (Keras) path on a format-/2 bundle's run: each stage at its own input size, and Stage 1's
    P(defective) = 1 - P(clean) of its 8 classes (not its first output, which is P(clean))."""
    pytest.importorskip("tensorflow")
    import keras

    from benchmarks.worker import _keras_pipeline
    from edge_runtime.bundle import load_bundle
    from edge_runtime.gate import stage1_score
    from edge_runtime.preprocess import preprocess_file

    bundle = load_bundle(tiny_bundle_v2)
    images = make_level_images(tmp_path / "images", per_class=2)
    paths = sorted(str(p) for p in images.rglob("*.png"))
    m1 = keras.models.load_model(Path(bundle.source_run) / "stage1.keras", compile=False)
    p1 = m1.predict(np.stack([preprocess_file(p, 24) for p in paths]).astype(np.float32), verbose=0)
    scores = stage1_score(p1, bundle.stage_classes[1])
    assert (scores >= 0.5).all() and (p1[:, 0] < 0.5).all()        # P(defective) and P(clean) disagree here
    spec = {"threads": 1, "image_sizes": {str(n): list(hw) for n, hw in bundle.image_sizes.items()},
            "stage1_classes": list(bundle.stage_classes[1]), "clean_label": "clean", "stage1_threshold": 0.5,
            "keras_run": bundle.source_run}
    # in this process TensorFlow is already running: its thread pools can no longer be sized (a worker does it)
    monkeypatch.setattr("benchmarks.worker._set_threads_tf", lambda threads: None)
    inspect, init_ms, version = _keras_pipeline(spec)
    parts = [inspect(p) for p in paths]
    assert init_ms > 0 and version.startswith("keras")
    assert all(x["stage2_ms"] is not None and x["stage1_ms"] > 0 for x in parts)     # every image went on


# ---- benchmarks/collector_load.py: the central side's load test (its checks on a real store, and a tiny run)

def _central_store(path: Path, keys: list[tuple[str, int]]) -> None:
    """A collector's SQLite store holding results for these (board, id), stored the collector's way."""
    import random as _random

    from central.storage import open_storage
    from edge_runtime.fleet.messages import parse_result
    from tests.support.messages import valid_result

    rng = _random.Random(0)
    storage = open_storage(path)
    try:
        storage.add_results([parse_result(b, json.dumps(valid_result(b, i, rng)).encode()) for b, i in keys])
    finally:
        storage.close()


def test_collector_load_exactly_once_check_finds_missing_and_extra_rows(tmp_path):
    """exactly_once passes only when every board's ids are exactly 1..N and the total matches what was sent."""
    from benchmarks.collector_load import Reader, exactly_once

    db = tmp_path / "c.sqlite3"
    _central_store(db, [("tool-a", 1), ("tool-a", 2), ("tool-b", 1), ("tool-b", 3), ("tool-c", 1)])
    reader = Reader(str(db))
    try:
        check = exactly_once(reader, {"tool-a": 3, "tool-b": 4}, 5)
        assert not check["ok"] and check["boards_wrong"] == ["tool-b"] and check["boards_unexpected"] == ["tool-c"]
        assert exactly_once(reader, {"tool-a": 3, "tool-c": 2}, 3)["boards_wrong"] == []
        assert not exactly_once(reader, {"tool-a": 3, "tool-c": 2}, 3)["ok"]      # tool-b's rows were not sent
        assert not exactly_once(reader, {"tool-a": 4, "tool-b": 4, "tool-c": 2}, 6)["ok"]   # tool-a's 3 missing
        # tool-b: as many rows as it sent (2) but ids 1 and 3: 2 missing, 3 never sent
        assert exactly_once(reader, {"tool-a": 3, "tool-b": 3, "tool-c": 2}, 5)["boards_wrong"] == ["tool-b"]
    finally:
        reader.close()
    _central_store(tmp_path / "d.sqlite3", [("tool-a", 1), ("tool-a", 2)])
    reader = Reader(str(tmp_path / "d.sqlite3"))
    try:
        assert exactly_once(reader, {"tool-a": 3}, 2)["ok"]
        assert not exactly_once(reader, {"tool-a": 3}, 3)["ok"]      # the publishers counted one more than stored
    finally:
        reader.close()


def test_collector_load_commit_watch_sees_each_sampled_row_once(tmp_path):
    """The commit-delay poll: each row of a sampled board counted once, however often it is seen, others not."""
    from benchmarks.collector_load import CommitWatch, Reader

    db = tmp_path / "c.sqlite3"
    _central_store(db, [("tool-a", 1), ("tool-a", 3), ("tool-b", 1)])
    watch = CommitWatch(Reader(str(db)), ["tool-a"])
    try:
        watch.poll()
        assert len(watch.take()) == 2 and watch.mark == {"tool-a": 1}
        _central_store(db, [("tool-a", 2), ("tool-a", 4)])
        watch.last = 0.0
        watch.poll()
        delays = watch.take()
        assert len(delays) == 2 and watch.mark == {"tool-a": 4} and all(d > 0 for d in delays)
    finally:
        watch.reader.close()


def test_collector_load_verdict_and_backlog_slope():
    """A step is sustained only when the publishers kept the rate, the backlog did not grow, all drained and no
    collector exited; the slope ignores the first third (the collectors' first batches)."""
    from benchmarks.collector_load import backlog_slope, verdict

    assert backlog_slope([(0, 5000), (5, 100), (6, 300), (7, 500), (8, 700)], 5) == pytest.approx(200)
    assert backlog_slope([(0, 0), (9, 50)], 5) == 0.0
    assert verdict(1000, 990, 20, 0.1, 5, []) == []
    assert verdict(1000, 960, 0, 0.1, 5, []) == ["publishers reached only 960/s"]
    assert verdict(1000, 1000, 31, 0.1, 5, []) == ["backlog grows 31/s"]
    assert verdict(1000, 1000, 0, None, 5, []) == ["not drained in 5 s"]
    assert verdict(1000, 1000, 0, 0.1, 5, [3]) == ["collector exited [3]"]


@needs_mosquitto
def test_collector_load_tiny_run_on_sqlite(tmp_path):
    """A real run with tiny numbers (3 boards, 40 results/s for 2 s, one collector on SQLite): every result
    stored once, the step judged by its own figures, delays measured, both reports written. Whether this
    machine sustains the rate is the benchmark's finding, not the test's."""
    from benchmarks import collector_load

    rc = collector_load.main(["--boards", "3", "--rates", "40", "--step-seconds", "2", "--db", "sqlite",
                              "--collectors", "1", "--sample", "1", "--out", str(tmp_path)])
    figures = json.loads((tmp_path / "results.json").read_text())
    (config,) = figures["configs"]
    (step,) = config["steps"]
    assert rc == 0 and config["exactly_once"]["ok"], config["exactly_once"]
    assert config["exactly_once"]["rows"] == step["sent"] == step["acked"] > 0
    assert step["rate"] == 40 and step["sustained"] == (step["why_not"] == "")
    assert config["sustained_rate"] == (40 if step["sustained"] else None)
    commit = step["delay_commit_s"]
    assert commit["n"] == step["sent"] and 0 < commit["p50"] <= commit["p99"] <= commit["max"]
    assert step["delay_insert_s"]["n"] == step["sent"] and step["collector_rss_peak_mb"][0] > 10
    assert config["collector_stop"][0]["counts"]["stored"] == step["sent"]
    found = "40" if step["sustained"] else "none"
    assert f"## sqlite, 1 collector(s): sustained {found} results/s" in (tmp_path / "results.md").read_text()
