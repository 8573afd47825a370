"""Train both stages: `python -m train --split split.csv --out runs/NAME [--profile quick|real|full] ...`.

Per stage: load the split view through the shared preprocessing, build the model (train/models.py),
phase 1 = frozen backbone (pretrained weights only), phase 2 = fine-tune the last dense block(s) at a
lower learning rate, class weights, early stopping with best-weight restore, best checkpoint kept.
Then gating is calibrated on val (Stage-1 threshold for the target defect recall) and everything is
evaluated on val and test; see train/report.py for what lands in runs/NAME/.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from train.config import BACKBONES, ConfigError, load_config
from train.datasets import SplitError, read_split, stage_view

log = logging.getLogger("train")
STAGE1_CLASSES = ["clean", "defective"]


def progress_logger(tag: str, epochs: int):
    """A Keras callback logging one line per epoch with ETA: long CPU runs must show they are alive."""
    import keras  # training-only dependency, imported when training starts

    class Progress(keras.callbacks.Callback):
        start = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.start is None:
                self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            done = epoch + 1
            elapsed = time.time() - self.start
            eta = elapsed / done * (epochs - done)
            vals = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items() if isinstance(v, float))
            log.info("%s epoch %d/%d %s | %.0fs/epoch, ETA %.1f min (early stopping may end sooner)",
                     tag, done, epochs, vals, elapsed / done, eta / 60)

    return Progress()


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """'balanced' weights: n / (k * count); classes absent from y get weight 1."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.ones(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return {i: float(w[i]) for i in range(n_classes)}


def limit_samples(samples, max_per_class: int, seed: int):
    """Quick profiles: at most `max_per_class` train images per 8-class label (a third of that in val/test)."""
    from train.data import limit_per_class

    if max_per_class <= 0:
        return samples
    kept = []
    for split, cap in (("train", max_per_class), ("val", max(4, max_per_class // 3)),
                       ("test", max(4, max_per_class // 3))):
        rows = limit_per_class([(x.path, x.label) for x in samples if x.split == split], cap, seed)
        kept.extend(type(samples[0])(path=p, label=lab, split=split) for p, lab in rows)
    return kept


def distribution_strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        log.info("%d GPUs visible: training under MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def resolve_weights(value: str) -> str | None:
    if value == "none":
        return None
    if value == "imagenet":
        return "imagenet"
    if not Path(value).is_file():
        raise SystemExit(f"error: --weights {value}: file not found (use imagenet, none, or a weights file)")
    return str(Path(value).resolve())


def stage_classes(stage: int, train_labels: list[str], cfg, target: str) -> list[str]:
    """The classes a stage is trained on: Stage 1 clean/defective, or the taxonomy classes present in the train
    split (target "taxonomy"); Stage 2 the defect classes present."""
    present = set(train_labels)
    if stage == 1:
        return STAGE1_CLASSES if target == "binary" else [c for c in cfg.taxonomy.classes if c in present]
    return [c for c in cfg.taxonomy.defects if c in present]


def train_stage(stage: int, rows: dict[str, list], *, cfg, profile, weights, out: Path, seed: int,
                backbone: str) -> dict:
    """Train one stage; returns predictions on val/test and its history. rows: split -> [(path, label)] with the
    8-class labels. Stage 1's `pred` is P(defective) and its `y` clean (0) / defective (1) whatever it was
    trained on, so gating and reports read the same thing."""
    from edge_runtime.gate import stage1_score
    from train.data import load_arrays

    size = profile.image_size_of(stage)
    target = profile.stage1.target if stage == 1 else "taxonomy"
    clean = cfg.taxonomy.clean
    if stage == 1 and target == "binary":
        rows = {split: [(p, clean if lab == clean else "defective") for p, lab in r] for split, r in rows.items()}
    sets = {split: load_arrays(rows[split], size) for split in ("train", "val", "test")}
    classes = stage_classes(stage, sets["train"].labels, cfg, target)
    if len(set(sets["train"].labels)) < 2 or (stage == 1 and clean not in classes):
        raise SystemExit(f"error: stage {stage} needs at least two classes (clean among them for Stage 1) in the "
                         f"train split, got {sorted(set(sets['train'].labels))}")
    for split in ("val", "test"):   # a class unseen in training cannot be predicted: keep it out, say so
        unseen = sorted(set(sets[split].labels) - set(classes))
        if unseen:
            log.warning("stage %d %s: classes %s are not in the train split and are left out", stage, split, unseen)
            keep = [i for i, lab in enumerate(sets[split].labels) if lab in classes]
            s = sets[split]
            sets[split] = type(s)(x=s.x[keep], labels=[s.labels[i] for i in keep], paths=[s.paths[i] for i in keep])
    y = {split: sets[split].targets(classes) for split in sets}
    log.info("stage %d (%s, %dx%d, %s, %s features, %d classes): %s", stage, backbone, size, size,
             profile.method_of(stage), profile.features_of(stage), len(classes),
             ", ".join(f"{s}={len(sets[s].x)}" for s in sets))
    fit = _fit_frozen if profile.method_of(stage) == "frozen" else _fit_keras
    model, history, best_phase, predict = fit(stage, sets, y, classes, cfg=cfg, profile=profile, weights=weights,
                                              out=out, seed=seed, backbone=backbone, size=size)
    model.save(out / f"stage{stage}.keras")
    pred = {s: predict(s) for s in ("val", "test")}
    result = {"model": model, "classes": classes, "history": history, "sets": sets, "y": y,
              "best_phase": best_phase, "pred": pred, "image_size": size}
    if stage == 1:
        # Reports, gating and convert read P(defective) and clean/defective truth, whatever Stage 1 learned.
        result["stage1_classes"] = ["defective"] if target == "binary" else classes
        result["classes"] = STAGE1_CLASSES
        for split in ("val", "test"):
            scores = pred[split][:, 1] if target == "binary" else stage1_score(pred[split], classes, clean)
            pred[split] = np.asarray(scores, float).reshape(-1, 1)
            y[split] = np.array([lab != clean for lab in sets[split].labels], dtype=np.int32)
    return result


def _fit_keras(stage, sets, y, classes, *, cfg, profile, weights, out, seed, backbone, size):
    """Keras training: phase 1 the head on the frozen backbone, phase 2 fine-tuning; best phase kept."""
    import keras

    from train.data import make_dataset
    from train.models import build_stage_model, set_trainable_blocks

    binary = classes == STAGE1_CLASSES
    model_cfg = getattr(cfg.models, f"stage{stage}")
    keras.utils.set_random_seed(seed + stage)
    with distribution_strategy().scope():
        model = build_stage_model(stage, backbone=backbone, image_size=size,
                                  num_classes=1 if binary else len(classes), weights=weights,
                                  dense_units=model_cfg.dense_units, dropout=model_cfg.dropout,
                                  pooling=profile.features_of(stage))
    loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
    metrics = ["accuracy"]
    batch = profile.batch_size
    train_ds = make_dataset(sets["train"].x, y["train"], batch, training=True, seed=seed)
    val_ds = make_dataset(sets["val"].x, y["val"], batch, training=False, seed=seed)
    weights_by_class = class_weights(y["train"], len(classes))
    checkpoint = out / "checkpoints" / f"stage{stage}.best.keras"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    history: dict[str, list] = {}

    if weights is not None:
        phases = [("phase1-frozen", 0, profile.lr_frozen, profile.epochs_frozen),
                  ("phase2-finetune", profile.finetune_blocks, profile.lr_finetune, profile.epochs_finetune)]
    else:
        # From scratch there is nothing to freeze or protect: the whole network trains at the head's
        # (phase-1) rate for the epochs of both phases.
        phases = [("from-scratch", 99, profile.lr_frozen, profile.epochs_frozen + profile.epochs_finetune)]
    best_val, best_weights, best_phase = np.inf, None, None
    for name, trainable_blocks, lr, epochs in phases:
        if epochs <= 0:
            continue
        n_trainable = set_trainable_blocks(model, trainable_blocks, freeze_batchnorm=weights is not None)
        log.info("stage %d %s: %d trainable backbone layers, lr=%g, up to %d epochs",
                 stage, name, n_trainable, lr, epochs)
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=metrics)
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=profile.patience,
                                                restore_best_weights=True)
        saver = keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True,
                                                initial_value_threshold=best_val if np.isfinite(best_val) else None)
        reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                   patience=max(2, profile.patience // 2), min_lr=lr / 50)
        fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=weights_by_class,
                        callbacks=[stopper, saver, reduce, progress_logger(f"stage{stage} {name}", epochs)],
                        verbose=0)
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        history.setdefault("phase", []).extend([name] * len(fit.history["loss"]))
        phase_best = float(np.min(fit.history["val_loss"]))   # EarlyStopping restored this phase's best
        if phase_best < best_val:
            best_val, best_weights, best_phase = phase_best, model.get_weights(), name
    if best_weights is not None:
        # Fine-tuning that never beats the frozen phase must not replace it: keep the best of all phases.
        model.set_weights(best_weights)
        log.info("stage %d: keeping the weights of %s (val_loss %.4f)", stage, best_phase, best_val)

    def predict(split):
        if len(sets[split].x) == 0:
            return np.zeros((0, 2 if binary else len(classes)))
        ds = make_dataset(sets[split].x, y[split], 64, training=False, seed=seed)
        p = model.predict(ds, verbose=0)
        return np.concatenate([1.0 - p, p], axis=1) if binary else p    # binary: [P(clean), P(defective)]

    return model, history, best_phase, predict


LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)     # L2 strengths tried for a frozen head; the best validation loss wins


def _fit_frozen(stage, sets, y, classes, *, cfg, profile, weights, out, seed, backbone, size):
    """Frozen pretrained backbone -> pooled features -> a softmax head fitted in numpy (edge_runtime.adapt.fit,
    the code adaptation uses), its L2 strength chosen on the validation split. The saved Keras model is the
    backbone with that head folded into one Dense layer, so convert treats it like any other run."""
    from edge_runtime.adapt.fit import balanced_weights, fit_softmax
    from train.models import feature_extractor, with_dense_head

    if weights is None:
        raise SystemExit("error: method frozen needs pretrained weights (--weights imagenet or a file)")
    extractor = feature_extractor(backbone, size, weights, profile.features_of(stage))
    feats = {s: extractor.predict(sets[s].x.astype(np.float32), batch_size=32, verbose=0) if len(sets[s].x)
             else np.zeros((0, extractor.output_shape[-1]), np.float32) for s in sets}
    history: dict[str, list] = {"lambda": [], "val_loss": []}
    best = None
    w = balanced_weights(y["train"], len(classes))
    for lam in LAMBDAS:
        head = fit_softmax(feats["train"], y["train"], classes, weights=w, lam=lam)
        p = head.probs(feats["val"]) if len(feats["val"]) else np.zeros((0, len(classes)))
        val_w = balanced_weights(y["val"], len(classes)) if len(y["val"]) else np.zeros(0)
        loss = float(-(val_w * np.log(p[np.arange(len(p)), y["val"]] + 1e-12)).sum() / max(val_w.sum(), 1e-12))
        history["lambda"].append(lam)
        history["val_loss"].append(loss)
        log.info("stage %d frozen head: lambda %g -> val loss %.4f", stage, lam, loss)
        if best is None or loss < best[0]:
            best = (loss, lam, head)
    _, lam, head = best
    if classes == STAGE1_CLASSES:       # the bundle's binary Stage 1 is one sigmoid unit: P(defective)
        head = head.as_sigmoid()
    model = with_dense_head(extractor, head, name=f"stage{stage}_{backbone}")

    def predict(split):
        if not len(feats[split]):
            return np.zeros((0, len(classes)))
        p = head.probs(feats[split])
        return np.concatenate([1.0 - p, p], axis=1) if classes == STAGE1_CLASSES else p

    history["chosen_lambda"] = lam
    return model, history, f"frozen-lambda-{lam:g}", predict


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sub-commands: `python -m train prepare ...`, `python -m train synth ...`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", action="append", metavar="DIR", help="dataset folder(s); prepared into OUT/data")
    src.add_argument("--split", metavar="CSV", help="a split.csv from `python -m train prepare`")
    p.add_argument("--out", required=True, metavar="runs/NAME")
    p.add_argument("--config", default=None, help="config YAML (default configs/default.yaml)")
    p.add_argument("--profile", default="quick", help="profile in the config: quick | real | scratch | full")
    p.add_argument("--stage", default="both", choices=["1", "2", "both"])
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a backbone weights file")
    p.add_argument("--stage1-backbone", choices=BACKBONES, help="override the profile's backbone for Stage 1")
    p.add_argument("--stage2-backbone", choices=BACKBONES, help="override the profile's backbone for Stage 2")
    p.add_argument("--seed", type=int, help="override the config seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.profile not in cfg.profiles:
        print(f"error: unknown profile {args.profile!r}; the config has {sorted(cfg.profiles)}", file=sys.stderr)
        return 2
    profile = cfg.profiles[args.profile]
    seed = cfg.seed if args.seed is None else args.seed
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(args.weights)
    backbones = {"stage1": args.stage1_backbone or profile.backbone_of(1),
                 "stage2": args.stage2_backbone or profile.backbone_of(2)}

    if args.data:
        from train.prepare import main as prepare_main
        data_args = [a for d in args.data for a in ("--data", d)]
        extra = ["--config", args.config] if args.config else []
        rc = prepare_main(data_args + ["--out", str(out / "data")] + extra)
        if rc != 0:
            return rc
        split_csv = out / "data" / "split.csv"
    else:
        split_csv = Path(args.split).resolve()
    try:
        samples = read_split(split_csv, cfg)
    except SplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "split.csv").write_text(split_csv.read_text(encoding="utf-8"), encoding="utf-8")
    samples = limit_samples(samples, profile.max_images_per_class, seed)

    from train.models import WeightsUnavailable, weights_source
    sources = {stage: weights_source(name, weights) for stage, name in backbones.items()}
    resolved = {"config": cfg.to_dict(), "run": {
        "profile": args.profile, "profile_settings": dataclasses.asdict(profile), "weights": args.weights,
        "weights_source": sources,
        "stage": args.stage, "backbones": backbones, "seed": seed, "split_csv": str(split_csv),
        "argv": sys.argv if argv is None else ["python", "-m", "train", *argv]}}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")

    started = time.time()
    stages = [1, 2] if args.stage == "both" else [int(args.stage)]
    results = {}
    for stage in stages:
        view = "master" if stage == 1 else "stage2"      # 8-class labels; train_stage maps Stage 1's target
        rows = {s: stage_view([x for x in samples if x.split == s], view, cfg.taxonomy.clean)
                for s in ("train", "val", "test")}
        t0 = time.time()
        try:
            results[stage] = train_stage(stage, rows, cfg=cfg, profile=profile, weights=weights, out=out,
                                         seed=seed, backbone=backbones[f"stage{stage}"])
        except WeightsUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results[stage]["seconds"] = time.time() - t0

    from train.report import evaluate_and_report
    run_info = {
        "image_size": profile.image_size_of(2),
        "image_sizes": {f"stage{n}": profile.image_size_of(n) for n in (1, 2)},
        "stage1_classes": results[1]["stage1_classes"] if 1 in results else ["defective"],
        "method": {f"stage{n}": profile.method_of(n) for n in (1, 2)},
        # frozen stages: the L2 strength chosen on val; convert refits these heads on the int8 features
        "head_lambda": {f"stage{n}": r["history"]["chosen_lambda"] for n, r in results.items()
                        if "chosen_lambda" in r["history"]},
        "features": {f"stage{n}": profile.features_of(n) for n in (1, 2)},
        "taxonomy": cfg.taxonomy.classes, "profile": args.profile,
        "weights": args.weights, "weights_source": sources, "backbones": backbones, "split_csv": str(split_csv), "seed": seed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()},
    }
    evaluate_and_report(results, samples, cfg=cfg, profile=profile, out=out, run_info=run_info,
                        wall_seconds=time.time() - started)
    log.info("run written to %s (%.1f min)", out, (time.time() - started) / 60)
    return 0
