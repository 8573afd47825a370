"""The frozen-feature method end to end on tiny models: per-stage input sizes and an 8-class Stage 1 in the
profile -> run.json -> `python -m convert --int8` (format /2) -> the runtime gives the run's answers; and the
cross-source learning curve (`--shots`) through the adapt code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.support.training import DEFECTS, TINY_PROFILE, tiny_config, write_dataset

CLASSES = ["clean", *DEFECTS]      # what write_dataset draws: Stage 1 learns these 4 (taxonomy target)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    from train.models import _tiny_cnn
    from train.trainer import main

    tmp = tmp_path_factory.mktemp("frozen")
    split_csv = write_dataset(tmp / "data", {"train": 10, "val": 6, "test": 4})
    weights = tmp / "tiny_backbone.weights.h5"
    _tiny_cnn((32, 32, 3), None).save_weights(weights)      # a "pretrained" backbone: fixed random filters
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["profiles"]["tinyfrozen"] = dict(TINY_PROFILE, method="frozen", stage1={"image_size": 32, "target": "taxonomy"},
                                         image_size=48)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "run"
    assert main(["--split", str(split_csv), "--out", str(out), "--config", str(tmp / "tiny.yaml"),
                 "--profile", "tinyfrozen", "--weights", str(weights)]) == 0
    return out


def test_run_records_each_stage_and_the_folded_head_gives_the_fitted_answers(frozen_run):
    import keras

    from edge_runtime.preprocess import preprocess_file

    info = json.loads((frozen_run / "run.json").read_text())
    assert info["image_sizes"] == {"stage1": 32, "stage2": 48} and info["image_size"] == 48
    assert info["stage1_classes"] == CLASSES and info["method"] == {"stage1": "frozen", "stage2": "frozen"}
    metrics = json.loads((frozen_run / "metrics.json").read_text())
    assert metrics["stage1"]["best_phase"].startswith("frozen-lambda-")
    model = keras.saving.load_model(frozen_run / "stage1.keras")
    assert tuple(model.inputs[0].shape) == (None, 32, 32, 3) and tuple(model.outputs[0].shape) == (None, 4)
    # the saved model is the extractor and one softmax Dense (the head's standardisation folded in)
    rows = [line.split(",") for line in (frozen_run / "split.csv").read_text().splitlines()[1:]]
    x = np.stack([preprocess_file(p, 32) for p, _, _ in rows[:6]]).astype(np.float32)
    dense = model.get_layer("defect_class")
    feats = keras.Model(model.inputs, model.get_layer("gap").output).predict(x, verbose=0)
    kernel, bias = dense.get_weights()
    logits = feats @ kernel + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(model.predict(x, verbose=0), probs / probs.sum(1, keepdims=True), atol=1e-5)


def test_convert_makes_a_format_2_bundle_the_runtime_agrees_with(frozen_run, tmp_path):
    from convert.cli import main
    from edge_runtime.bundle import load_bundle

    bundle = tmp_path / "bundle"
    assert main(["--int8", "--run", str(frozen_run), "--out", str(bundle), "--calibration", "16"]) == 0
    b = load_bundle(bundle)
    assert b.format == "sem-inspect-bundle/2" and b.image_sizes == {1: (32, 32), 2: (48, 48)}
    assert b.stage_classes[1] == tuple(CLASSES)
    # frozen stages: heads refitted on the bundle's own int8 features, the threshold recalibrated on val
    assert set(b.manifest["heads_fitted"]) == {"stage1", "stage2"}
    assert all("int8 features of the train split" in v for v in b.manifest["heads_fitted"].values())
    report = json.loads((bundle / "compare.json").read_text())
    int8 = report["models"]["int8"]
    assert int8["stage1"]["agreement"] >= 0.75 and int8["end_to_end"]["agreement"] >= 0.6
    assert b.manifest["replay"]["images"] == sum(1 for r in (frozen_run / "split.csv").read_text().splitlines()
                                                 if r.endswith(",train"))


def test_learning_curve_refits_through_the_adapt_code(frozen_run, tmp_path, monkeypatch):
    from train import shots

    rows = [line.split(",") for line in (frozen_run / "split.csv").read_text().splitlines()[1:]]
    held_out = [(p, lab) for p, lab, s in rows if s in ("val", "test")]
    calls = []
    real_refit = shots.refit
    monkeypatch.setattr(shots, "refit", lambda *a, **k: calls.append(k) or real_refit(*a, **k))
    curve = shots.learning_curve(frozen_run, held_out, [0, 2], seeds=2)
    assert [p["k"] for p in curve["points"]] == [0, 2]
    zero, two = curve["points"]
    assert len(zero["runs"]) == 1 and zero["runs"][0]["scored"] == len(held_out)
    assert len(two["runs"]) == 2 and len(calls) == 2
    assert all(r["scored"] == len(held_out) - 2 * len(CLASSES) for r in two["runs"])
    for key in shots.METRICS:
        m = two[key]
        assert m is None or m["min"] <= m["mean"] <= m["max"]
    text = shots.render_shots({"eight": curve})
    assert "| eight | 2 | 2 |" in text
