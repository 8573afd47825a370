"""python -m convert check BUNDLE: each runtime in its own process on the same images, compared with the first.

Identical kernels must agree exactly; a planted difference (one Stage-1 score moved by 3 steps, one Stage-2
top-1 swapped) must be reported as such (labels n-1/n, S1 3 steps, exit 1); a runtime the manifest says is too
old is refused and reported as safe; a crashing one fails the check; bad input is exit 2."""
from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from convert.cli import main
from tests.support.images import make_pattern_images
from tests.support.tflrt import tflite_runtime_python


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parity") / "images"
    make_pattern_images(folder)
    return folder


def check(capsys, *argv) -> tuple[int, str, str]:
    code = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("runtime", "---"):
            rows[cells[0]] = cells
    return rows


def test_the_same_kernels_twice_agree_exactly(tiny_bundle, images, capsys, tmp_path):
    code, out, err = check(capsys, tiny_bundle, "--images", images, "--runtime", "a=litert:builtin,b=litert:builtin",
                           "--json", tmp_path / "r.json")
    assert code == 0, err
    rows = table_rows(out)
    assert rows["a"][-1] == "reference" and rows["b"][-1] == "parity"
    assert rows["b"][4:8] == ["10", "10/10", "0", "0"]          # images, labels, S1 steps, S2 steps
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"] is True and [r["status"] for r in report["runtimes"]] == ["ok", "ok"]


PLANT = textwrap.dedent("""
    # Runs the real worker, then moves image 0's Stage-1 score by 3 output steps and swaps image 1's Stage-2
    # top-1 with its lowest class.
    import json, subprocess, sys
    proc = subprocess.run([sys.executable] + sys.argv[1:], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    step = float({step!r})
    rows = sorted((r for r in result["images"] if "error" not in r), key=lambda r: r["path"])
    rows[0]["stage1"][0] += 3 * step
    s2 = rows[1]["stage2"]
    hi, lo = s2.index(max(s2)), s2.index(min(s2))
    s2[hi], s2[lo] = s2[lo], s2[hi]
    print(json.dumps(result))
""")


def test_a_planted_difference_is_reported_in_steps_and_labels(tiny_bundle, images, capsys, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["gating"]["stage1_threshold"] = 0.0          # every image goes to Stage 2: its top-1 is the label
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    stage2 = manifest["variants"]["int8"]["stage2"]["output"]["scale"]
    plant = tmp_path / "plant.py"
    plant.write_text(PLANT.format(step=manifest["variants"]["int8"]["stage1"]["output"]["scale"]))
    code, out, err = check(capsys, bundle, "--images", images, "--runtime", "ref=litert:builtin,planted=litert:builtin",
                           "--python", f"planted={sys.executable} {plant}", "--json", tmp_path / "r.json")
    assert code == 1, err
    row = table_rows(out)["planted"]
    assert row[4:7] == ["10", "9/10", "3"] and row[-1] == "DIFFERS"
    assert float(row[7]) >= 1 and float(row[7]) == pytest.approx(round(float(row[7])))   # whole steps of
    assert stage2 > 0                                                                    # Stage 2's scale
    assert json.loads((tmp_path / "r.json").read_text())["parity"] is False


DROP = textwrap.dedent("""
    # Runs the real worker, then reports every image as unreadable: nothing compared must not pass as parity.
    import json, subprocess, sys
    proc = subprocess.run([sys.executable] + sys.argv[1:], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["images"] = [{"path": r["path"], "error": "cannot read"} for r in result["images"]]
    print(json.dumps(result))
""")


def test_a_runtime_that_scored_no_image_is_not_parity(tiny_bundle, images, capsys, tmp_path):
    drop = tmp_path / "drop.py"
    drop.write_text(DROP)
    code, out, err = check(capsys, tiny_bundle, "--images", images, "--runtime", "a=litert:builtin,b=litert:builtin",
                           "--python", f"b={sys.executable} {drop}")
    assert code == 1, err
    assert table_rows(out)["b"][4:6] == ["0", "0/0"] and table_rows(out)["b"][-1] == "DIFFERS"


def test_a_runtime_too_old_for_the_bundle_is_refused_and_that_is_safe(tiny_bundle, images, capsys, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    for stage in ("stage1", "stage2"):
        manifest["variants"]["int8"][stage]["min_runtime"]["tensorflow"] = "99.0.0"
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    code, out, err = check(capsys, bundle, "--images", images, "--runtime", "a=litert:builtin,b=litert:builtin,tensorflow")
    assert code == 0, err
    row = table_rows(out)["tensorflow"]
    assert row[-1].startswith("refused (safe)")
    assert re.search(r"needs tensorflow(-cpu)? >= 99\.0\.0, this is tensorflow(-cpu)? \d", row[-1]), row[-1]


def test_a_crashing_runtime_fails_the_check(tiny_bundle, images, capsys, tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    code, out, err = check(capsys, tiny_bundle, "--images", images, "--runtime", "a=litert,b=litert:builtin,c=litert",
                           "--python", f"c={sys.executable} {crash}")
    assert code == 1, err
    assert table_rows(out)["c"][-1].startswith("crashed: signal 11")


@pytest.mark.parametrize("argv, message", [
    (["--runtime", "litert,tflite"], "unknown runtime 'tflite'"),
    (["--runtime", "litert:fast,litert"], "unknown kernels 'fast'"),
    (["--runtime", "litert,litert"], "give distinct runtimes"),
    (["--python", "nope=/usr/bin/python3"], "expected LABEL=COMMAND"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--runtime", "a=litert,b=litert", "--python", "b=/nonexistent/python"], "fewer than two runtimes ran"),
], ids=["runtime", "kernels", "twice", "python-label", "limit", "one-ran"])
def test_bad_input_is_exit_2_with_one_line(tiny_bundle, images, capsys, argv, message):
    code, out, err = check(capsys, tiny_bundle, "--images", images, *argv)
    assert code == 2 and out == ""
    assert message in err and err.strip().count("\n") == err.count("check:")   # one error line after progress


def test_bad_bundle_and_images_are_exit_2(tiny_bundle, images, capsys, tmp_path):
    code, _, err = check(capsys, tmp_path / "nope", "--images", images)
    assert code == 2 and "bundle folder does not exist" in err
    code, _, err = check(capsys, tiny_bundle, "--images", tmp_path / "missing.png")
    assert code == 2 and "no such file or folder" in err


def test_tflite_runtime_matches_litert_builtin_kernels_exactly(tiny_bundle, images, capsys):
    """tflite-runtime 2.14 runs int8 on TFLite's built-in kernels; LiteRT's built-in kernels give the same bits."""
    python = tflite_runtime_python()
    code, out, err = check(capsys, tiny_bundle, "--images", images, "--runtime", "litert:builtin,tflite-runtime",
                           "--python", f"tflite-runtime={python}")
    assert code == 0, err
    row = table_rows(out)["tflite-runtime"]
    assert row[1] == "tflite-runtime 2.14.0" and row[4:8] == ["10", "10/10", "0", "0"] and row[-1] == "parity"


def test_tflite_runtime_refuses_a_per_channel_bundle_in_the_check(tiny_bundle_per_channel, images, capsys):
    python = tflite_runtime_python()
    code, out, err = check(capsys, tiny_bundle_per_channel, "--images", images, "--runtime",
                           "litert,litert:builtin,tflite-runtime", "--python", f"tflite-runtime={python}")
    assert code in (0, 1), err          # LiteRT's XNNPACK and built-in kernels may differ by a step here
    assert table_rows(out)["tflite-runtime"][-1].startswith("refused (safe)")


# ---- format /2: each stage at its own size, labels from the heads' probabilities ----------------------------

def v2_copy(tiny_bundle_v2: Path, images: Path, tmp_path: Path, threshold: float | None = None) -> Path:
    """The format-/2 tiny bundle with its threshold in the middle of its scores on `images` (some flagged, some
    not), or at `threshold`."""
    from edge_runtime.inspector import Inspector

    bundle = tmp_path / "b2"
    shutil.copytree(tiny_bundle_v2, bundle)
    if threshold is None:
        inspector = Inspector(bundle, threads=1)
        scores = sorted(inspector.inspect(p).stage1_score for p in sorted(images.iterdir()))
        threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["gating"]["stage1_threshold"] = threshold
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return bundle


def test_format2_runs_each_stage_at_its_size_and_labels_as_edge_inspect(tiny_bundle_v2, images, capsys, tmp_path):
    from edge_runtime.inspector import Inspector

    bundle = v2_copy(tiny_bundle_v2, images, tmp_path)
    code, out, err = check(capsys, bundle, "--images", images, "--runtime", "a=litert,b=litert",
                           "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "inputs 24x24 / 32x32" in out and "backbone features in output quantization steps" in out
    assert table_rows(out)["b"][4:9] == ["10", "10/10", "0", "0", "0"] and table_rows(out)["b"][-1] == "parity"
    ref = json.loads((tmp_path / "r.json").read_text())["runtimes"][0]["images"]
    inspector = Inspector(bundle, threads=1)
    labels = set()
    for row in ref:
        expected = inspector.inspect(row["path"])
        assert len(row["stage1"]) == 32 and len(row["probs1"]) == 8 and len(row["probs2"]) == 3    # features, heads
        assert row["stage1_score"] == pytest.approx(expected.stage1_score, abs=1e-6)
        assert row["label"] == expected.label
        labels.add(row["label"])
    assert "clean" in labels and len(labels) > 1          # both sides of the threshold were compared


PLANT_PROBS = textwrap.dedent("""
    # Runs the real worker, then swaps image 0's Stage-2 top-1 probability with its lowest one (features untouched).
    import json, subprocess, sys
    proc = subprocess.run([sys.executable] + sys.argv[1:], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    p2 = sorted((r for r in result["images"] if "error" not in r), key=lambda r: r["path"])[0]["probs2"]
    hi, lo = p2.index(max(p2)), p2.index(min(p2))
    p2[hi], p2[lo] = p2[lo], p2[hi]
    print(json.dumps(result))
""")


def test_format2_labels_come_from_the_heads_probabilities(tiny_bundle_v2, images, capsys, tmp_path):
    bundle = v2_copy(tiny_bundle_v2, images, tmp_path, threshold=0.0)      # every image's label is its Stage-2 top-1
    plant = tmp_path / "plant.py"
    plant.write_text(PLANT_PROBS)
    code, out, err = check(capsys, bundle, "--images", images, "--runtime", "ref=litert:builtin,planted=litert:builtin",
                           "--python", f"planted={sys.executable} {plant}")
    assert code == 1, err
    assert table_rows(out)["planted"][4:8] == ["10", "9/10", "0", "0"]      # same features, one label differs


def test_tflite_runtime_matches_litert_builtin_on_a_format2_bundle(tiny_bundle_v2, images, capsys, tmp_path):
    python = tflite_runtime_python()
    bundle = v2_copy(tiny_bundle_v2, images, tmp_path)
    code, out, err = check(capsys, bundle, "--images", images, "--runtime", "litert:builtin,tflite-runtime",
                           "--python", f"tflite-runtime={python}")
    assert code == 0, err
    row = table_rows(out)["tflite-runtime"]
    assert row[1] == "tflite-runtime 2.14.0" and row[4:9] == ["10", "10/10", "0", "0", "0"] and row[-1] == "parity"
