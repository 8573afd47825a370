"""Training: artefacts of a quick run, metrics from real predictions, weights handling, gating maths."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_runtime.evaluation import classification_metrics, escape_rate, roc_auc, threshold_for_recall, two_stage_labels
from tests.support.training import DEFECTS, TINY_PROFILE, pattern, tiny_config, write_dataset


def run_training(tmp_path: Path, split_csv: Path, name: str) -> Path:
    from train.trainer import main

    out = tmp_path / "runs" / name
    rc = main(["--split", str(split_csv), "--out", str(out), "--config", str(tiny_config(tmp_path)),
               "--profile", "tiny", "--weights", "none"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def separable_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("separable")
    split_csv = write_dataset(tmp / "data", {"train": 20, "val": 8, "test": 8})
    return run_training(tmp, split_csv, "separable")


def test_quick_run_writes_every_artefact(separable_run):
    for name in ("stage1.keras", "stage2.keras", "config.yaml", "run.json", "metrics.json", "history.json",
                 "report.md", "split.csv", "stage1_curves.png", "stage2_curves.png", "stage1_confusion.png",
                 "stage2_confusion.png", "e2e_confusion.png"):
        assert (separable_run / name).is_file(), name
    run = json.loads((separable_run / "run.json").read_text())
    assert run["image_size"] == 32 and run["stage2_classes"] == DEFECTS
    assert 0.0 <= run["stage1_threshold"] <= 1.0
    resolved = yaml.safe_load((separable_run / "config.yaml").read_text())
    assert resolved["run"]["profile"] == "tiny" and resolved["run"]["weights"] == "none"
    metrics = json.loads((separable_run / "metrics.json").read_text())
    for stage in ("stage1", "stage2"):
        for split in ("val", "test"):
            m = metrics[stage][split]
            assert {"accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class",
                    "confusion_matrix"} <= set(m)
    assert "escape_rate" in metrics["end_to_end_test"]


def test_separable_data_is_learned_and_metrics_match_the_saved_models(separable_run):
    import keras

    from edge_runtime.preprocess import preprocess_file

    metrics = json.loads((separable_run / "metrics.json").read_text())
    run = json.loads((separable_run / "run.json").read_text())
    assert metrics["stage2"]["test"]["accuracy"] >= 0.8
    assert metrics["end_to_end_test"]["macro_f1"] >= 0.6
    # Recompute Stage-1 test metrics independently from the saved model and the split.
    rows = list(csv.DictReader((separable_run / "split.csv").open()))
    test = [r for r in rows if r["split"] == "test"]
    x = np.stack([preprocess_file(r["path"], 32) for r in test]).astype(np.float32)
    scores = keras.models.load_model(separable_run / "stage1.keras").predict(x, verbose=0).reshape(-1)
    truth = np.array([r["label"] != "clean" for r in test], dtype=int)
    pred = (scores >= run["stage1_threshold"]).astype(int)
    recomputed = classification_metrics(truth, pred, ["clean", "defective"])
    assert recomputed["confusion_matrix"] == metrics["stage1"]["test"]["confusion_matrix"]


def test_shuffled_labels_score_near_chance(tmp_path):
    split_csv = write_dataset(tmp_path / "data", {"train": 16, "val": 8, "test": 12}, shuffle_labels=True, seed=1)
    out = run_training(tmp_path, split_csv, "shuffled")
    metrics = json.loads((out / "metrics.json").read_text())
    # 3 defect classes: chance is 1/3; nothing learnable should stay far from the separable run's >= 0.8.
    assert metrics["stage2"]["test"]["accuracy"] <= 0.6
    assert metrics["end_to_end_test"]["macro_f1"] <= 0.5


def test_local_densenet_weights_file_is_loaded(tmp_path):
    import keras

    from train.models import backbone_of, build_stage_model

    source = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "densenet121_notop.weights.h5"
    source.save_weights(path)
    model = build_stage_model(1, backbone="densenet121", image_size=32, num_classes=1, weights=str(path))
    loaded = backbone_of(model).get_layer("conv1_conv").get_weights()[0]
    np.testing.assert_array_equal(loaded, source.get_layer("conv1_conv").get_weights()[0])


def test_imagenet_offline_is_a_clear_error(monkeypatch):
    import keras

    from train.models import WeightsUnavailable, build_stage_model

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.densenet.file_utils.get_file", offline, raising=False)
    with pytest.raises(WeightsUnavailable, match=r"--weights PATH.*--weights none"):
        build_stage_model(1, backbone="densenet121", image_size=32, num_classes=1, weights="imagenet")


def test_training_preprocessing_equals_runtime_preprocessing(tmp_path):
    """The arrays the model is trained/evaluated on are byte-identical to what edge_runtime feeds it."""
    from edge_runtime.preprocess import preprocess_file
    from train.data import load_arrays, make_dataset

    paths = []
    for i, mode in enumerate(["L", "RGB", "RGBA", "P", "I;16"]):
        img = Image.fromarray(pattern("opens", np.random.default_rng(i), 57))
        img = img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
        path = tmp_path / f"img_{mode.replace(';', '')}.png"
        img.save(path)
        paths.append(str(path))
    arrays = load_arrays([(p, "opens") for p in paths], 48)
    batch = next(iter(make_dataset(arrays.x, np.zeros(len(paths), np.int32), 8, training=False, seed=0)))[0]
    for i, p in enumerate(paths):
        runtime = preprocess_file(p, 48)
        np.testing.assert_array_equal(arrays.x[i], runtime)
        np.testing.assert_array_equal(batch.numpy()[i], runtime.astype(np.float32))


def test_threshold_reaches_target_recall():
    scores = np.linspace(0.01, 0.99, 100)
    t = threshold_for_recall(scores, 0.98)
    assert np.mean(scores >= t) >= 0.98
    assert np.mean(scores >= t + 0.02) < 0.98   # and it is the largest such threshold


def test_two_stage_labels_gate_and_review():
    labels, review = two_stage_labels([0.1, 0.9, 0.95], [[0.9, 0.1], [0.2, 0.8], [0.55, 0.45]], 0.5,
                                      ["bridges", "opens"], review_floor=0.6)
    assert list(labels) == ["clean", "opens", "bridges"]
    assert list(review) == [False, False, True]
    esc = escape_rate(["bridges", "clean", "opens"], ["clean", "clean", "opens"])
    assert esc["escapes"] == 1 and esc["defective"] == 2 and esc["escape_rate"] == 0.5


def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]


def test_roc_auc_by_hand():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5      # ties count half
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.1, 0.2], [1, 1]) is None


def train_from_pretrained(tmp, **profile):
    """Stage-1 training from a (tiny) pretrained backbone file; returns (run folder, source backbone)."""
    from train.models import _tiny_cnn
    from train.trainer import main

    split_csv = write_dataset(tmp / "data", {"train": 12, "val": 8, "test": 4})
    weights = tmp / "tiny_backbone.weights.h5"
    backbone = _tiny_cnn((32, 32, 3), None)
    for layer in backbone.layers:       # distinctive ImageNet-like statistics, far from BN's 0/1 defaults
        if layer.weights and "bn" in layer.name:
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, beta, mean + 7.0, var * 3.0])
    backbone.save_weights(weights)
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["profiles"]["tiny"] = dict(TINY_PROFILE, finetune_blocks=3, patience=5, **profile)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "run"
    rc = main(["--split", str(split_csv), "--out", str(out), "--config", str(tmp / "tiny.yaml"),
               "--profile", "tiny", "--weights", str(weights), "--stage", "1"])
    assert rc == 0
    return out, backbone


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """Fine-tuning only (no frozen phase), so the saved model is the fine-tuned one."""
    return train_from_pretrained(tmp_path_factory.mktemp("pretrained"), epochs_frozen=0, epochs_finetune=3,
                                 lr_finetune=0.003)


@pytest.fixture(scope="module")
def diverging_finetune_run(tmp_path_factory):
    """A fine-tuning rate that wrecks the model: the frozen phase's weights must be the ones saved."""
    return train_from_pretrained(tmp_path_factory.mktemp("diverging"), epochs_frozen=3, epochs_finetune=2,
                                 lr_finetune=50.0)


def test_pretrained_batchnorm_keeps_its_statistics_while_fine_tuning(pretrained_run):
    """Keras 3 runs BN on batch statistics once its layers are trainable, whatever `training=False` said:
    the pretrained statistics must come out of both phases unchanged."""
    import keras

    from train.models import backbone_of

    out, source = pretrained_run
    trained = backbone_of(keras.models.load_model(out / "stage1.keras"))
    history = json.loads((out / "history.json").read_text())["stage1"]
    assert set(history["phase"]) == {"phase2-finetune"}     # the backbone really was unfrozen
    for layer in source.layers:
        if layer.weights and "bn" in layer.name:
            _g, _b, mean, var = layer.get_weights()
            _tg, _tb, t_mean, t_var = trained.get_layer(layer.name).get_weights()
            np.testing.assert_allclose(t_mean, mean, rtol=1e-6)
            np.testing.assert_allclose(t_var, var, rtol=1e-6)


def test_fine_tuning_that_does_not_beat_the_frozen_phase_is_discarded(diverging_finetune_run):
    import keras

    from edge_runtime.preprocess import preprocess_file

    out, _ = diverging_finetune_run
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())["stage1"]
    assert metrics["stage1"]["best_phase"] == "phase1-frozen"
    frozen_best = min(v for v, p in zip(history["val_loss"], history["phase"]) if p == "phase1-frozen")
    rows = [r for r in csv.DictReader((out / "split.csv").open()) if r["split"] == "val"]
    x = np.stack([preprocess_file(r["path"], 32) for r in rows]).astype(np.float32)
    y = np.array([r["label"] != "clean" for r in rows], np.float32)
    p = np.clip(keras.models.load_model(out / "stage1.keras").predict(x, verbose=0).reshape(-1), 1e-7, 1 - 1e-7)
    saved_loss = float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))
    assert saved_loss == pytest.approx(frozen_best, rel=1e-3)
