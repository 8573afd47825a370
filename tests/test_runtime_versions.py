"""Minimum runtime versions: `python -m convert` records them per model (from the op versions and per-channel
dense layers actually in it, convert/compat.py) and the edge refuses an older interpreter with one line, exit 2.
The tflite-runtime 2.14 path runs where `make setup-tflrt` could install it and skips with its reason elsewhere."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.bundles import conv_weight_scales, fc_weight_scales
from tests.support.paths import REPO
from tests.support.tflrt import tflite_runtime_python


def with_min_runtime(bundle: Path, dest: Path, **min_runtime) -> Path:
    shutil.copytree(bundle, dest)
    manifest = yaml.safe_load((dest / "manifest.yaml").read_text())
    for stage in ("stage1", "stage2"):
        manifest["variants"]["int8"][stage]["min_runtime"] = dict(min_runtime)
        manifest["variants"]["int8"][stage]["min_runtime_reason"] = "set by the test"
    (dest / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dest


def an_image(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
    return path


# ---- what the converter records --------------------------------------------------------------------------

def test_dense_layers_are_per_tensor_by_default_and_convolutions_stay_per_channel(tiny_bundle):
    manifest = yaml.safe_load((tiny_bundle / "manifest.yaml").read_text())
    for stage in (1, 2):
        data = (tiny_bundle / f"stage{stage}.tflite").read_bytes()
        assert fc_weight_scales(data) and set(fc_weight_scales(data)) == {1}
        assert max(conv_weight_scales(data)) > 1
        entry = manifest["variants"]["int8"][f"stage{stage}"]
        assert entry["ops"]["FULLY_CONNECTED"] == 4 and entry["ops"]["CONV_2D"] == 3
        # Only the op versions limit it: TensorFlow Lite 1.x-era ops, tflite-runtime 2.14 is new enough.
        assert entry["min_runtime"]["tflite-runtime"] == entry["min_runtime"]["tensorflow"]
        assert entry["min_runtime"]["tflite-runtime"].startswith("1.")
        assert entry["min_runtime"]["litert"] == "1.0.1"
        assert "per-channel" not in entry["min_runtime_reason"]


def test_per_channel_dense_layers_raise_the_minimum_above_tflite_runtime_2_14(tiny_bundle_per_channel):
    manifest = yaml.safe_load((tiny_bundle_per_channel / "manifest.yaml").read_text())
    for stage in (1, 2):
        data = (tiny_bundle_per_channel / f"stage{stage}.tflite").read_bytes()
        assert max(fc_weight_scales(data)) > 1                 # the first dense layer has 256 units
        entry = manifest["variants"]["int8"][f"stage{stage}"]
        assert entry["ops"]["FULLY_CONNECTED"] == 4            # the op version does not show it ...
        assert entry["min_runtime"]["tflite-runtime"] == "2.16.0"   # ... the manifest does
        assert "per-channel int8 dense layers" in entry["min_runtime_reason"]


def test_recorded_ops_are_the_models_operators(tiny_bundle):
    from edge_runtime.interpreter import make_interpreter

    manifest = yaml.safe_load((tiny_bundle / "manifest.yaml").read_text())
    for variant in ("int8", "float32"):
        for stage in (1, 2):
            entry = manifest["variants"][variant][f"stage{stage}"]
            interp = make_interpreter(model_path=str(tiny_bundle / entry["file"]), num_threads=1,
                                      kernels="builtin")
            assert set(entry["ops"]) == {op["op_name"] for op in interp._get_ops_details()}


# ---- the edge refuses an interpreter that is too old -----------------------------------------------------

def test_version_key():
    from edge_runtime.interpreter import version_key

    assert version_key("2.14.0") < version_key("2.16.0") < version_key("2.16.1") < version_key("10.0")
    assert version_key("2.21.0rc1") == (2, 21, 0) and version_key("1.15") == (1, 15, 0)
    with pytest.raises(ValueError):
        version_key("two")


def test_too_old_litert_is_refused_with_one_line_and_exit_2(tiny_bundle, tmp_path, capsys):
    from edge_runtime.cli import main
    from edge_runtime.inspector import Inspector
    from edge_runtime.interpreter import RuntimeTooOld, backend_version

    dist, have = backend_version("litert")
    bundle = with_min_runtime(tiny_bundle, tmp_path / "b", litert="99.0.0")
    with pytest.raises(RuntimeTooOld, match=rf"needs {dist} >= 99.0.0, this is {dist} {have} \(set by the test\)"):
        Inspector(bundle, runtime="litert", threads=1)
    assert main(["--models", str(bundle), "--runtime", "litert", "--json", str(an_image(tmp_path))]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "needs ai-edge-litert >= 99.0.0" in err and "refusing to run it" in err


def test_runtime_exactly_at_the_minimum_runs(tiny_bundle, tmp_path):
    from edge_runtime.inspector import Inspector
    from edge_runtime.interpreter import backend_version

    _, have = backend_version("litert")
    bundle = with_min_runtime(tiny_bundle, tmp_path / "b", litert=have, **{"tflite-runtime": "99.0.0"})
    result = Inspector(bundle, runtime="litert", threads=1).inspect(str(an_image(tmp_path)))
    assert result.label in ("clean", "bridges", "cracks", "opens")


def test_the_watch_service_refuses_it_too(tiny_bundle, tmp_path, capsys):
    from edge_runtime.cli import main

    bundle = with_min_runtime(tiny_bundle, tmp_path / "b", litert="99.0.0")
    (tmp_path / "in").mkdir()
    code = main(["--models", str(bundle), "--runtime", "litert", "--watch", str(tmp_path / "in"), "--once",
                 "--db", str(tmp_path / "r.sqlite3"), "--leave-in-place"])
    assert code == 2 and "needs ai-edge-litert >= 99.0.0" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["two", 2.16, ["2.16.0"]])
def test_malformed_min_runtime_is_a_bundle_error(tiny_bundle, tmp_path, value):
    from edge_runtime.bundle import BundleError, load_bundle

    bundle = with_min_runtime(tiny_bundle, tmp_path / "b", litert=value)
    with pytest.raises(BundleError, match="min_runtime.litert must be a version"):
        load_bundle(bundle)


def test_bundles_without_recorded_minimums_still_load_and_run(tiny_bundle, tmp_path):
    from edge_runtime.inspector import Inspector

    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    for variant in manifest["variants"].values():
        for stage in variant.values():
            for key in ("ops", "min_runtime", "min_runtime_reason"):
                stage.pop(key)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    insp = Inspector(bundle, threads=1)
    assert insp.bundle.stage1.min_runtime == {}
    assert insp.inspect(str(an_image(tmp_path))).label


# ---- tflite-runtime 2.14 -------------------------------------------------------------------------------

def edge_inspect(python: str, bundle: Path, images: Path, runtime: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([python, "-m", "edge_runtime.cli", "--models", str(bundle), "--runtime", runtime,
                           "--threads", "1", "--json", str(images)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_tflite_runtime_refuses_per_channel_dense_layers(tiny_bundle_per_channel, tmp_path):
    python = tflite_runtime_python()
    proc = edge_inspect(python, tiny_bundle_per_channel, an_image(tmp_path), "tflite-runtime")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "needs tflite-runtime >= 2.16.0, this is tflite-runtime 2.14.0" in proc.stderr
    assert "per-channel int8 dense layers" in proc.stderr


def test_tflite_runtime_runs_the_default_bundle_like_litert(tiny_bundle, tmp_path):
    """Same labels as LiteRT on the tiny bundle, scores within one output step (tflite-runtime 2.14 runs int8 on
    TFLite's built-in kernels, LiteRT on XNNPACK; on this small graph they agree)."""
    python = tflite_runtime_python()
    from tests.support.images import make_pattern_images
    from tests.support.inspect_output import rows_by_name

    images = tmp_path / "images"
    make_pattern_images(images)
    old = edge_inspect(python, tiny_bundle, images, "tflite-runtime")
    assert old.returncode == 0, old.stderr
    new = edge_inspect(sys.executable, tiny_bundle, images, "litert")
    assert new.returncode == 0, new.stderr
    a, b = rows_by_name(new.stdout), rows_by_name(old.stdout)
    assert sorted(a) == sorted(b) and len(a) == 10
    step = yaml.safe_load((tiny_bundle / "manifest.yaml").read_text())["variants"]["int8"]["stage1"]["output"]["scale"]
    for name in a:
        assert b[name]["label"] == a[name]["label"], name
        assert abs(b[name]["stage1_score"] - a[name]["stage1_score"]) <= step + 1e-6, name
    runtime = json.loads(subprocess.run(
        [python, "-c", "import json, tflite_runtime; print(json.dumps(tflite_runtime.__version__))"],
        capture_output=True, text=True, timeout=60).stdout)
    assert runtime == "2.14.0"
