"""python -m convert: a tiny trained run -> int8/float32 bundle; manifest, integer graph, calibration, bad input.

The run is built here: synthetic class-patterned PNGs, a split.csv, and tiny_cnn stage models trained for a
few seconds (so their outputs are decisive), saved the way training saves them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.bundles import TAXONOMY, conv_weight_scales, fc_weight_scales
from tests.support.runs import DEFECTS, REVIEW_FLOOR, SEED, SIZE, THRESHOLD


def manifest_of(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "manifest.yaml").read_text())


def broken_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def no_bundle_left(out: Path) -> bool:
    """Neither the bundle nor any temp folder of it exists."""
    parent = out.parent
    return not out.exists() and (not parent.exists() or not any(p.name.startswith(f".{out.name}.")
                                                               for p in parent.iterdir()))


# ---- the bundle --------------------------------------------------------------------------------------------

def test_bundle_has_models_manifest_and_calibration(converted):
    bundle, run = converted["bundle"], converted["run"]
    names = {p.name for p in bundle.iterdir()}
    assert {"manifest.yaml", "stage1.tflite", "stage2.tflite", "stage1_float32.tflite", "stage2_float32.tflite",
            "stage1_head.npz", "stage2_head.npz", "replay.npz", "calibration.txt", "compare.json",
            "compare.md"} <= names
    m = manifest_of(bundle)
    assert m["format"] == "sem-inspect-bundle/2"
    assert m["taxonomy"] == TAXONOMY and m["stage2_classes"] == DEFECTS
    assert m["input"]["channels"] == 3
    for n in (1, 2):
        stage = m["stages"][f"stage{n}"]
        assert stage["image_size"] == [SIZE, SIZE] and stage["backbone"] == "tiny_cnn"
        assert stage["head"]["file"] == f"stage{n}_head.npz" and stage["head"]["activations"][0] == "relu"
    assert m["stages"]["stage1"]["classes"] == ["defective"] and m["stages"]["stage2"]["classes"] == DEFECTS
    # the replay set: the train split's features through the int8 backbones, for adaptation
    train_rows = sum(1 for line in (run / "split.csv").read_text().splitlines()[1:] if line.endswith(",train"))
    assert m["replay"]["images"] == train_rows and m["replay"]["variant"] == "int8"
    assert m["gating"] == {"stage1_threshold": THRESHOLD, "stage2_review_floor": REVIEW_FLOOR}
    assert m["default_variant"] == "int8" and set(m["variants"]) == {"int8", "float32"}
    assert m["source_run"] == str(run.resolve())
    assert {"python", "tensorflow", "keras", "numpy", "ai-edge-litert"} <= set(m["tools"])
    cal = m["calibration"]
    assert cal["count"] == 20 and cal["requested"] == 20 and cal["split"] == "train" and cal["seed"] == SEED
    assert sum(cal["per_class"].values()) == 20 and set(cal["per_class"]) == set(TAXONOMY)
    assert cal["input_range_anchor"] is True          # synthetic pixels span 30..220 only
    assert m["variants"]["int8"]["stage1"]["input"]["dtype"] == "uint8"
    assert m["variants"]["float32"]["stage2"]["input"]["dtype"] == "float32"


def test_int8_backbones_have_per_channel_convolutions_and_no_dense_layers(converted):
    """Format /2: the dense layers are the numpy head, so the int8 backbones hold convolutions only
    (per-channel) and need no runtime newer than op versions ask for; the dense setting is still recorded (it
    applies to whole-model exports, tests/test_runtime_versions.py)."""
    manifest = manifest_of(converted["bundle"])
    assert manifest["quantization"] == {"convolutions": "per-channel", "dense": "per-tensor"}
    for stage in (1, 2):
        data = (converted["bundle"] / f"stage{stage}.tflite").read_bytes()
        assert fc_weight_scales(data) == [] and max(conv_weight_scales(data)) > 1
        assert "FULLY_CONNECTED" not in manifest["variants"]["int8"][f"stage{stage}"]["ops"]
        assert manifest["variants"]["int8"][f"stage{stage}"]["min_runtime"]["tflite-runtime"].startswith("1.")


def test_sha256_of_every_file_matches(converted):
    bundle = converted["bundle"]
    m = manifest_of(bundle)
    listed = [(s["file"], s["sha256"], s["bytes"]) for v in m["variants"].values() for s in v.values()]
    listed += [(name, f["sha256"], f["bytes"]) for name, f in m["files"].items()]
    assert len(listed) == 5
    for name, digest, size in listed:
        data = (bundle / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == size, name


def test_int8_models_are_integer_end_to_end(converted):
    from convert.export import float_ops
    from edge_runtime.interpreter import make_interpreter

    for stage in (1, 2):
        data = (converted["bundle"] / f"stage{stage}.tflite").read_bytes()
        assert float_ops(data) == []
        interp = make_interpreter(model_content=data, num_threads=1)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        assert np.dtype(inp["dtype"]) == np.uint8 and inp["quantization"] == (1.0, 0)
        assert np.dtype(out["dtype"]) == np.int8
        internal = [t for t in interp.get_tensor_details() if t["index"] != inp["index"]]
        assert internal
        kinds = {np.dtype(t["dtype"]).name for t in internal}
        assert kinds <= {"int8", "int32"}, kinds           # int32: biases and reduction axes
        int32 = [t for t in internal if np.dtype(t["dtype"]) == np.int32]
        assert all(len(t["shape"]) <= 1 for t in int32)      # only bias vectors / axes are int32
        ops = {op["op_name"] for op in interp._get_ops_details()}
        assert "CONV_2D" in ops and "MEAN" in ops and "DEQUANTIZE" not in ops
        assert "FULLY_CONNECTED" not in ops                   # the head runs in numpy (format /2)


def test_float32_variant_is_float(converted):
    from edge_runtime.interpreter import make_interpreter

    interp = make_interpreter(model_path=str(converted["bundle"] / "stage1_float32.tflite"), num_threads=1)
    assert np.dtype(interp.get_input_details()[0]["dtype"]) == np.float32


def test_calibration_uses_train_split_only(converted):
    bundle, run = converted["bundle"], converted["run"]
    listed = (bundle / "calibration.txt").read_text().splitlines()
    rows = [line.split(",") for line in (run / "split.csv").read_text().splitlines()[1:]]
    split_of = {p: s for p, _, s in rows}
    assert len(listed) == 20 and len(set(listed)) == 20
    assert {split_of[p] for p in listed} == {"train"}


def test_calibration_selection_is_stratified_and_deterministic(converted):
    from convert.calibration import anchor_input_range, select
    from train.runs import read_run

    run = read_run(converted["run"])
    rows = run.rows("train")
    a = select(rows, 12, SIZE, seed=SEED)
    b = select(rows, 12, SIZE, seed=SEED)
    c = select(rows, 12, SIZE, seed=SEED + 1)
    assert a.files == b.files and np.array_equal(a.images, b.images)
    assert a.files != c.files
    assert min(a.per_class().values()) >= 1 and set(a.per_class()) == set(TAXONOMY)
    assert a.images.shape == (12, SIZE, SIZE, 3) and a.images.dtype == np.uint8
    anchored, applied = anchor_input_range(a.images)
    assert applied and anchored.min() == 0 and anchored.max() == 255 and a.images.min() > 0
    assert np.count_nonzero(anchored != a.images) <= 6      # two pixels x three channels


def test_allocate_is_proportional_with_one_per_class():
    from convert.calibration import allocate

    q = allocate({"clean": 100, "bridges": 50, "vias": 1, "other": 0}, 20)
    assert sum(q.values()) == 20 and q["vias"] == 1 and q["other"] == 0
    assert q["clean"] > q["bridges"] > q["vias"]
    assert allocate({"a": 2, "b": 3}, 200) == {"a": 2, "b": 3}            # fewer images than asked: all
    assert allocate({"a": 5, "b": 9, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}   # fewer than classes: largest


def test_unreadable_calibration_files_are_skipped_and_replaced(tmp_path, converted):
    from convert.calibration import select
    from train.runs import read_run

    rows = read_run(converted["run"]).rows("train")
    bad = []
    for i in range(3):
        bad.append(str(tmp_path / f"bad{i}.png"))
        Path(bad[-1]).write_bytes(b"not a png")
    everything = select(rows + [(b, "clean") for b in bad], 1000, SIZE, seed=SEED)
    assert sorted(p for p, _ in everything.skipped) == bad
    assert all("not an image" in reason for _, reason in everything.skipped)
    assert sorted(everything.files) == sorted(p for p, _ in rows)
    good = [p for p, lab in rows if lab == "clean"][:3]
    mixed = select([(p, "clean") for p in good + bad], 3, SIZE, seed=SEED)
    assert sorted(mixed.files) == sorted(good)         # unreadable picks are replaced from the same class
    assert {p for p, _ in mixed.skipped} <= set(bad)


# ---- bad input: exit 2, a message, nothing left behind ------------------------------------------------------

def run_main(argv, capsys):
    from convert.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("breakage, message", [
    ("missing", "run folder not found"),
    ("no_run_json", "run.json: missing"),
    ("no_stage2", "stage2.keras: missing"),
    ("corrupt_keras", "not a readable Keras model"),
    ("stage1_as_stage2", "is not a Stage-2 model"),
    ("wrong_image_size", "does not match run.json image_size"),
    ("bad_run_json", "not valid JSON"),
])
def test_bad_run_is_refused(breakage, message, converted, tmp_path, capsys):
    run = broken_copy(converted["run"], tmp_path)
    if breakage == "missing":
        shutil.rmtree(run)
    elif breakage == "no_run_json":
        (run / "run.json").unlink()
    elif breakage == "no_stage2":
        (run / "stage2.keras").unlink()
    elif breakage == "corrupt_keras":
        (run / "stage1.keras").write_bytes(np.random.default_rng(0).bytes(4096))
    elif breakage == "stage1_as_stage2":
        shutil.copy(run / "stage1.keras", run / "stage2.keras")
    elif breakage == "wrong_image_size":
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "image_size": 64}))
    elif breakage == "bad_run_json":
        (run / "run.json").write_text("{truncated")
    out = tmp_path / "models" / "tiny"
    rc, err = run_main(["--int8", "--run", str(run), "--out", str(out)], capsys)
    assert rc == 2
    assert message in err
    assert no_bundle_left(out)


def test_empty_calibration_set_is_refused(converted, tmp_path, capsys):
    run = broken_copy(converted["run"], tmp_path)
    data = tmp_path / "garbage"
    data.mkdir()
    lines = ["path,label,split"]
    for p, label, split in (line.split(",") for line in (run / "split.csv").read_text().splitlines()[1:]):
        if split == "train":   # every train image unreadable
            p = str(data / Path(p).name)
            Path(p).write_bytes(b"")
        lines.append(f"{p},{label},{split}")
    (run / "split.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "models" / "tiny"
    rc, err = run_main(["--int8", "--run", str(run), "--out", str(out)], capsys)
    assert rc == 2 and "no readable image in the train split" in err and "empty file" in err
    assert no_bundle_left(out)


def test_a_variant_is_required(converted, capsys):
    from convert.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--run", str(converted["run"])])
    assert exc.value.code == 2 and "at least one variant" in capsys.readouterr().err


def test_out_that_is_not_a_bundle_is_not_replaced(converted, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, err = run_main(["--float32", "--run", str(converted["run"]), "--out", str(out)], capsys)
    assert rc == 2 and "not a model bundle" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_float_ops_fail_unless_allowed(converted, tmp_path, capsys, monkeypatch):
    """The int8 graph check: a fallback op is named and stops the conversion unless --allow-float-ops."""
    import convert.export

    real = convert.export.float_ops
    monkeypatch.setattr(convert.export, "float_ops", lambda data: real(data) + ["EXP#3"])
    out = tmp_path / "models" / "tiny"
    argv = ["--int8", "--run", str(converted["run"]), "--out", str(out), "--calibration", "8", "--no-compare"]
    rc, err = run_main(argv, capsys)
    assert rc == 2 and "EXP#3" in err and "--allow-float-ops" in err
    assert no_bundle_left(out)
    rc, err = run_main(argv + ["--allow-float-ops"], capsys)
    assert rc == 0
    m = manifest_of(out)
    assert m["float_ops"] == {"stage1": ["EXP#3"], "stage2": ["EXP#3"]} and m["calibration"]["count"] == 8
    assert not (out / "compare.json").exists()        # --no-compare
