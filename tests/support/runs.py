"""A run folder as training writes it (run.json, stageN.keras, split.csv) with tiny_cnn stage models trained for a
few seconds on class-patterned images (so their outputs are decisive), and that run converted to a bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.bundles import TAXONOMY

SIZE = 32
DEFECTS = TAXONOMY[1:]
PER_SPLIT = {"train": 4, "val": 1, "test": 2}
THRESHOLD = 0.5
REVIEW_FLOOR = 0.4
SEED = 7


def synth_image(class_index: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A class-specific stripe pattern on noise; pixels stay inside 30..220 (so calibration needs the anchor)."""
    img = rng.integers(30, 90, (size, size)).astype(np.uint8)
    if class_index:
        period = 2 + class_index
        if class_index % 2:
            img[:, ::period] = 220
        else:
            img[::period, :] = 220
    return img


def make_run(root: Path, train_models: bool = True, stage1_size: int = SIZE) -> Path:
    """A run folder as training writes it: run.json, stage1/2.keras, split.csv, config.yaml. stage1_size: Stage 1's
    own input size (run.json image_sizes), when it differs from Stage 2's SIZE."""
    import keras

    from edge_runtime.preprocess import preprocess_file
    from train.models import build_stage_model

    rng = np.random.default_rng(0)
    data, run = root / "data", root / "runs" / "tiny"
    run.mkdir(parents=True)
    rows = []
    for k, label in enumerate(TAXONOMY):
        (data / label).mkdir(parents=True)
        for split, n in PER_SPLIT.items():
            for i in range(n):
                path = data / label / f"{split}_{i}.png"
                Image.fromarray(synth_image(k, rng), mode="L").save(path)
                rows.append((str(path), label, split))
    (run / "split.csv").write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))

    keras.utils.set_random_seed(SEED)
    train = [(p, lab) for p, lab, s in rows if s == "train"]
    sizes = {1: stage1_size, 2: SIZE}
    labels = np.array([lab for _, lab in train])
    for stage in (1, 2):
        x = np.stack([preprocess_file(p, sizes[stage]) for p, _ in train]).astype(np.float32)
        n = 1 if stage == 1 else len(DEFECTS)
        model = build_stage_model(stage, backbone="tiny_cnn", image_size=sizes[stage], num_classes=n,
                                  dense_units=32, dropout=0.0)
        if train_models:
            if stage == 1:
                xs, ys = x, (labels != "clean").astype(np.float32)
                model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
            else:
                keep = labels != "clean"
                xs, ys = x[keep], np.array([DEFECTS.index(lab) for lab in labels[keep]])
                model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
            model.fit(xs, ys, epochs=25, batch_size=8, verbose=0)
        model.save(run / f"stage{stage}.keras")
    (run / "run.json").write_text(json.dumps({
        "image_size": SIZE, "taxonomy": TAXONOMY, "stage2_classes": DEFECTS, "stage1_threshold": THRESHOLD,
        "stage2_review_floor": REVIEW_FLOOR, "backbones": {"stage1": "tiny_cnn", "stage2": "tiny_cnn"},
        "profile": "quick", "weights": "none", "split_csv": str(run / "split.csv"), "seed": SEED,
        "created": "2026-01-01T00:00:00+00:00",
        **({"image_sizes": {"stage1": stage1_size, "stage2": SIZE}} if stage1_size != SIZE else {})}))
    return run


def convert_run(root: Path) -> dict:
    """make_run under root, then `python -m convert --int8 --float32` of it: {root, run, bundle, stdout}."""
    import contextlib
    import io

    from convert.cli import main

    run = make_run(root)
    bundle = root / "models" / "tiny"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--int8", "--float32", "--run", str(run), "--out", str(bundle), "--calibration", "20"])
    assert rc == 0, stdout.getvalue()
    return {"root": root, "run": run, "bundle": bundle, "stdout": stdout.getvalue()}
