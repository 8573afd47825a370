"""python -m convert compare: the numbers come from real predictions of the float and TFLite models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.support.runs import DEFECTS, SIZE, THRESHOLD


@pytest.fixture(scope="session")
def independent(converted):
    """The test split predicted here, without convert.compare: Keras in float, int8 Stage 1 by hand."""
    import keras

    from edge_runtime.interpreter import make_interpreter
    from edge_runtime.preprocess import preprocess_file

    rows = [line.split(",") for line in (converted["run"] / "split.csv").read_text().splitlines()[1:]]
    test = [(p, lab) for p, lab, s in rows if s == "test"]
    x = np.stack([preprocess_file(p, SIZE) for p, _ in test])
    labels = np.array([lab for _, lab in test])
    p1 = keras.saving.load_model(converted["run"] / "stage1.keras").predict(x.astype(np.float32), verbose=0)[:, 0]
    p2 = keras.saving.load_model(converted["run"] / "stage2.keras").predict(x.astype(np.float32), verbose=0)
    def int8_stage(n):
        """Backbone features from the interpreter by hand, then the head's arrays applied by hand."""
        interp = make_interpreter(model_path=str(converted["bundle"] / f"stage{n}.tflite"), num_threads=1)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        scale, zero = out["quantization"]
        head = np.load(converted["bundle"] / f"stage{n}_head.npz")
        probs = []
        for img in x:
            interp.set_tensor(inp["index"], img[None])          # uint8 pixels: input scale 1.0, zero point 0
            interp.invoke()
            f = (interp.get_tensor(out["index"])[0].astype(np.float64) - zero) * scale
            h = np.maximum(((f - head["mean"]) / head["scale"]) @ head["W0"] + head["b0"], 0.0)
            probs.append(h @ head["W1"] + head["b1"])              # logits: order kept by sigmoid/softmax
        return np.array(probs)

    q1 = 1.0 / (1.0 + np.exp(-int8_stage(1)[:, 0]))
    q2_top = int8_stage(2).argmax(axis=1)
    return {"labels": labels, "p1": p1, "p2": p2, "int8_p1": np.array(q1), "int8_p2_top": np.array(q2_top)}


def test_keras_numbers_match_an_independent_evaluation(converted, independent):
    report = json.loads((converted["bundle"] / "compare.json").read_text())
    labels, p1, p2 = independent["labels"], independent["p1"], independent["p2"]
    assert report["images"] == len(labels) == 16 and report["split"] == "test"
    keras_m = report["models"]["keras-float32"]
    defective = labels != "clean"
    assert keras_m["stage1"]["accuracy"] == pytest.approx(np.mean((p1 >= THRESHOLD) == defective))
    s2_pred = np.array(DEFECTS)[p2.argmax(axis=1)]
    assert keras_m["stage2"]["accuracy"] == pytest.approx(np.mean(s2_pred[defective] == labels[defective]))
    final = np.where(p1 >= THRESHOLD, s2_pred, "clean")
    assert keras_m["end_to_end"]["accuracy"] == pytest.approx(np.mean(final == labels))
    escapes = int(np.sum(defective & (final == "clean")))
    assert keras_m["end_to_end"]["escapes"] == escapes
    assert keras_m["end_to_end"]["escape_rate"] == pytest.approx(escapes / defective.sum())
    # The tiny models were trained: the comparison is not between two coin flips.
    assert keras_m["stage1"]["accuracy"] >= 0.75 and keras_m["stage2"]["accuracy"] >= 0.5


def test_int8_numbers_match_the_interpreter(converted, independent):
    report = json.loads((converted["bundle"] / "compare.json").read_text())
    int8 = report["models"]["int8"]["stage1"]
    labels, q1, p1 = independent["labels"], independent["int8_p1"], independent["p1"]
    assert int8["accuracy"] == pytest.approx(np.mean((q1 >= THRESHOLD) == (labels != "clean")))
    assert int8["agreement"] == pytest.approx(np.mean((q1 >= THRESHOLD) == (p1 >= THRESHOLD)))
    assert int8["mean_abs_error"] == pytest.approx(np.mean(np.abs(q1 - p1)), abs=1e-6)
    assert 0.0 < int8["mean_abs_error"] < 0.2       # quantised: close to float, but not bit-identical
    # Stage 2 is compared on the defect images of a class it knows: same top-1 class as the float model.
    known = np.isin(labels, DEFECTS)
    same = independent["int8_p2_top"][known] == independent["p2"][known].argmax(axis=1)
    assert report["models"]["int8"]["stage2"]["agreement"] == pytest.approx(same.mean())


def test_float32_tflite_agrees_with_keras(converted):
    models = json.loads((converted["bundle"] / "compare.json").read_text())["models"]
    f32 = models["float32"]
    for stage in ("stage1", "stage2"):
        assert f32[stage]["agreement"] == 1.0 and f32[stage]["mean_abs_error"] < 1e-4
        assert f32[stage]["accuracy"] == models["keras-float32"][stage]["accuracy"]
    assert f32["end_to_end"]["agreement"] == 1.0


def test_sizes_and_markdown_table(converted):
    bundle = converted["bundle"]
    models = json.loads((bundle / "compare.json").read_text())["models"]
    int8_bytes = sum((bundle / f"stage{s}.tflite").stat().st_size for s in (1, 2))
    f32_bytes = sum((bundle / f"stage{s}_float32.tflite").stat().st_size for s in (1, 2))
    keras_bytes = sum((converted["run"] / f"stage{s}.keras").stat().st_size for s in (1, 2))
    assert models["int8"]["bytes"] == int8_bytes and models["keras-float32"]["bytes"] == keras_bytes
    assert models["int8"]["size_ratio_float32_tflite"] == pytest.approx(int8_bytes / f32_bytes)
    assert int8_bytes < f32_bytes
    table = (bundle / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "S1 acc" not in line]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["keras-float32", "float32", "int8"]
    assert "| keras-float32 |" in converted["stdout"]          # printed at the end of the conversion
    for name in ("keras-float32", "float32", "int8"):
        with Image.open(bundle / f"confusion_{name}.png") as png:
            assert png.format == "PNG" and png.size[0] > 300


def test_evaluate_on_hand_made_predictions():
    from convert.compare import evaluate

    run = SimpleNamespace(stage1_threshold=0.5, clean_label="clean", stage2_classes=["a", "b"],
                          taxonomy=["clean", "a", "b"], stage2_review_floor=0.6)
    labels = ["clean", "clean", "a", "b", "a"]
    ref_p1 = np.array([0.1, 0.4, 0.9, 0.2, 0.8])
    ref_p2 = np.array([[.5, .5], [.9, .1], [.8, .2], [.3, .7], [.6, .4]])
    ref = evaluate(ref_p1, ref_p2, labels, run)
    ref_out = {"p1": ref_p1, "p2": ref_p2, "final": ref["final_labels"]}
    p1 = np.array([0.1, 0.7, 0.9, 0.2, 0.8])
    p2 = np.array([[.5, .5], [.9, .1], [.8, .2], [.3, .7], [.45, .55]])
    m = evaluate(p1, p2, labels, run, ref_out)
    assert m["stage1"]["accuracy"] == pytest.approx(3 / 5)
    assert m["stage1"]["agreement"] == pytest.approx(4 / 5)
    assert m["stage1"]["mean_abs_error"] == pytest.approx(0.3 / 5)
    assert m["stage2"]["accuracy"] == pytest.approx(2 / 3) and m["stage2"]["n"] == 3
    assert m["stage2"]["agreement"] == pytest.approx(2 / 3)
    assert m["stage2"]["mean_abs_error"] == pytest.approx(0.3 / 6)
    e = m["end_to_end"]
    assert m["final_labels"] == ["clean", "a", "a", "clean", "b"]
    assert e["accuracy"] == pytest.approx(2 / 5) and e["agreement"] == pytest.approx(3 / 5)
    assert (e["escapes"], e["defective"], e["false_alarms"], e["review"]) == (1, 3, 1, 1)
    assert ref["end_to_end"]["escapes"] == 1 and ref["end_to_end"]["accuracy"] == pytest.approx(4 / 5)


def test_compare_command_writes_to_out(converted, tmp_path, capsys):
    from convert.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "--run", str(converted["run"]), "--bundle", str(converted["bundle"]), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| int8 |" in printed and "| float32 |" in printed
    report = json.loads((out / "compare.json").read_text())
    first = json.loads((converted["bundle"] / "compare.json").read_text())
    assert report["models"]["int8"]["stage2"] == first["models"]["int8"]["stage2"]   # deterministic
    assert (out / "compare.md").is_file() and (out / "confusion_int8.png").is_file()


def test_tampered_or_foreign_bundle_is_refused(converted, tmp_path, capsys):
    from convert.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(converted["bundle"], bundle)
    model = bundle / "stage2.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    argv = ["compare", "--run", str(converted["run"]), "--bundle", str(bundle), "--out", str(tmp_path / "o")]
    assert main(argv) == 2 and "stage2.tflite: sha256 mismatch" in capsys.readouterr().err

    shutil.rmtree(bundle)
    shutil.copytree(converted["bundle"], bundle)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["stage2_classes"] = list(reversed(manifest["stage2_classes"]))
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    # the bundle itself is inconsistent now: its Stage-2 head names the classes in the other order
    assert main(argv) == 2 and "differ from stage2_classes" in capsys.readouterr().err
    manifest["stages"]["stage2"]["classes"] = manifest["stage2_classes"]
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    assert main(argv) == 2 and "do not belong together" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_int8_targets_are_judged_from_the_numbers():
    from convert.compare import int8_targets

    def model(f1, agree, escape, ratio):
        return {"end_to_end": {"macro_f1": f1, "escape_rate": escape}, "stage2": {"agreement": agree},
                "size_ratio_float32_tflite": ratio, "size_ratio_keras": ratio}

    good = int8_targets({"keras-float32": model(0.900, None, 0.05, 1.0), "int8": model(0.895, 0.99, 0.05, 0.26)})
    assert good["all_ok"] and good["checks"]["e2e_macro_f1_drop_pp"]["value"] == pytest.approx(0.5)
    bad = int8_targets({"keras-float32": model(0.900, None, 0.05, 1.0), "int8": model(0.880, 0.97, 0.06, 0.5)})
    assert not bad["all_ok"]
    assert [k for k, c in bad["checks"].items() if c["ok"]] == []


def test_edge_inspector_reproduces_the_int8_labels(converted):
    """The edge runtime, fed the same files, reaches the labels compare reported for int8."""
    inspector = pytest.importorskip("edge_runtime.inspector", reason="edge_runtime.inspector not available")
    report = json.loads((converted["bundle"] / "compare.json").read_text())
    pred = report["predictions"]
    edge = inspector.Inspector(converted["bundle"], variant="int8", threads=1)
    for i, path in enumerate(pred["paths"]):
        result = edge.inspect(path)
        assert result.label == pred["final"]["int8"][i], path
        assert result.stage1_score == pytest.approx(pred["stage1_score"]["int8"][i], abs=1e-5)


def test_bundle_is_read_by_edge_runtime_each_file_hashed_once(tiny_bundle, tmp_path, monkeypatch):
    """compare reads bundles through edge_runtime.bundle: every variant's models, each sha256-checked once."""
    from tests.support.bundles import TINY_SIZE, TINY_STAGE2
    from convert.compare import CompareError, read_bundle
    from edge_runtime import bundle as bundle_mod

    hashed = []
    real_bytes, real_file = bundle_mod.sha256_bytes, bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_bytes", lambda data: hashed.append(len(data)) or real_bytes(data))
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda path: hashed.append(path) or real_file(path))
    run = SimpleNamespace(stage2_classes=TINY_STAGE2, image_size=TINY_SIZE, image_size_of=lambda n: TINY_SIZE,
                          stage1_classes=["defective"])
    bundle, models = read_bundle(tiny_bundle, run)
    manifest_size = (tiny_bundle / "manifest.yaml").stat().st_size
    # 2 variants x 2 stages, once each, and the manifest once (the bundle id)
    assert sorted(models) == ["float32", "int8"] and len(hashed) == 5 and hashed.count(manifest_size) == 1
    for variant in models:
        for stage in (1, 2):
            assert models[variant][stage] == bundle.stage(stage, variant).path.read_bytes()
    # A changed model of a variant other than the default one is refused too, naming the file.
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "stage2_float32.tflite", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CompareError, match=r"stage2_float32\.tflite: sha256 mismatch"):
        read_bundle(copy, run)
    with pytest.raises(CompareError, match="do not belong together"):
        read_bundle(tiny_bundle, SimpleNamespace(stage2_classes=list(reversed(TINY_STAGE2)), image_size=TINY_SIZE))


def test_only_the_fabs_reviewed_images_beside_the_deployed_bundle_as_recorded(converted, tmp_path, capsys):
    """`compare --only EXPORT`: the split's images under an `edge-inspect export-labels` folder, and the labels
    the deployed bundle gave them on the board (its manifest's model_label) scored on the same images."""
    import csv

    from convert.cli import main
    from edge_runtime.review.export_labels import FIELDS, MANIFEST

    run = tmp_path / "run"
    shutil.copytree(converted["run"], run)
    with open(run / "split.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    test = [r for r in rows if r["split"] == "test"]
    exported, manifest = test[:8], []
    reviewed = tmp_path / "reviewed"
    for k, r in enumerate(exported):            # the board got the first 5 right and called the rest "clean"
        rel = f"{r['label']}/{k}-{Path(r['path']).name}"
        (reviewed / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r["path"], reviewed / rel)
        r["path"] = str(reviewed / rel)
        manifest.append({"file": rel, "label": r["label"], "model_label": r["label"] if k < 5 else "clean",
                         "result_id": k + 1, "bundle_id": "ab" * 32})
    with open(run / "split.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    with open(reviewed / MANIFEST, "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, restval="")
        writer.writeheader()
        writer.writerows(manifest)
    truth = [r["label"] for r in exported]
    expected_acc = np.mean([m["model_label"] == t for m, t in zip(manifest, truth)])

    out = tmp_path / "out"
    assert main(["compare", "--run", str(run), "--bundle", str(converted["bundle"]), "--only", str(reviewed),
                 "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["images"] == 8 and report["only"] == str(reviewed.resolve())
    assert sorted(report["predictions"]["paths"]) == sorted(r["path"] for r in exported)
    rv = report["reviewed"]
    assert rv["images"] == 8 and rv["bundles"] == {"ab" * 32: 8}
    assert rv["recorded"]["accuracy"] == pytest.approx(expected_acc)
    assert rv["recorded"]["escapes"] == sum(t != "clean" for t in truth[5:])
    for name, m in report["models"].items():      # the models here, on exactly those images
        assert rv["models"][name]["accuracy"] == pytest.approx(m["end_to_end"]["accuracy"])
    table = (out / "compare.md").read_text()
    assert f"| recorded on the board | {100 * expected_acc:.1f} |" in table and "under " + str(reviewed.resolve()) in table

    (reviewed / MANIFEST).unlink()              # not an export: only the subset, nothing recorded to compare
    assert main(["compare", "--run", str(run), "--bundle", str(converted["bundle"]), "--only", str(reviewed),
                 "--out", str(out), "--threads", "1"]) == 0
    assert json.loads((out / "compare.json").read_text())["reviewed"] is None
    capsys.readouterr()
    assert main(["compare", "--run", str(run), "--bundle", str(converted["bundle"]), "--only", str(tmp_path / "x"),
                 "--out", str(out)]) == 2
    assert "no image of the test split lies under --only" in capsys.readouterr().err
