"""python -m convert --int8 --run runs/NAME [...]   and   python -m convert compare --run runs/NAME --bundle models/NAME
(and `python -m convert sensitivity --run runs/NAME`: which layers lose the most to int8, convert/sensitivity.py;
`python -m convert check BUNDLE --images DIR`: the same answers on every runtime?, convert/parity.py;
`python -m convert keygen --out DIR` and `python -m convert sign BUNDLE --key KEY`: signatures, convert/sign.py)

Convert: read a training run (run.json, stage1.keras, stage2.keras, split.csv), check that the Keras files
are our two stages, calibrate int8 on N train-split images, export the requested variants, refuse float
fallbacks in the int8 graph, write the bundle (format /2: each stage a TFLite backbone and a numpy head,
convert.bundle.write_bundle_v2; atomically: temp folder + rename), then cross-compare.

Exit codes: 0 ok; 2 bad input (missing/corrupt run, not our stage model, empty calibration set, float ops in
the int8 graph, bad arguments); 1 a conversion or comparison that failed for another reason.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import importlib.metadata
import logging
import os
import platform
import sys
import warnings
from pathlib import Path


from convert.export import DEFAULT_DENSE_QUANTIZATION, DENSE_QUANTIZATION
from train.runs import Run, RunError, load_models, read_run

log = logging.getLogger("convert")

class ConvertError(ValueError):
    """The converted model is not what the edge needs (e.g. float ops in the int8 graph)."""


# ---- convert ---------------------------------------------------------------------------------------------

def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist, key in (("tensorflow", "tensorflow"), ("tensorflow-cpu", "tensorflow"), ("keras", "keras"),
                      ("numpy", "numpy"), ("ai-edge-litert", "ai-edge-litert"), ("Pillow", "pillow")):
        if key in versions:
            continue
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import tensorflow as tf   # the version that actually converted (wheel name varies)
        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return versions


def convert_run(args) -> tuple[Path, Run]:
    """The convert command: returns the bundle path and the (loaded) run.
    Raises RunError / CalibrationError / ConvertError (bad input), RuntimeError (converter failure)."""
    from convert import calibration as calib
    from convert.bundle import write_bundle_v2
    from convert.export import export_tflite, float_ops, io_quantization, split_stage_model

    variants = [v for v, on in (("int8", args.int8), ("float16", args.fp16), ("dynamic", args.dynamic),
                                ("float32", args.float32)) if on]
    run = read_run(args.run)
    out = Path(args.out or Path("models") / run.name).resolve()
    if out == run.path or run.path in out.parents:
        raise RunError(f"--out {out} is inside the run folder; choose another folder (default models/{run.name})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.yaml").is_file())):
        # write_bundle_v2 replaces the folder whole: never let that swallow something that is not a bundle
        raise RunError(f"--out {out} exists and is not a model bundle; refusing to replace it")
    load_models(run)
    sizes = {n: run.image_size_of(n) for n in (1, 2)}
    log.info("run %s: Stage 1 %dx%d (%s), Stage 2 %dx%d %s, threshold %.4f, review floor %.2f",
             run.path, sizes[1], sizes[1], "/".join(run.stage1_classes), sizes[2], sizes[2], run.stage2_classes,
             run.stage1_threshold, run.stage2_review_floor)
    # Each stage becomes a backbone (TFLite, pixels -> pooled features) and a numpy head (bundle format /2).
    parts = {}
    for n in (1, 2):
        try:
            parts[n] = split_stage_model(run.models[n], run.stage1_classes if n == 1 else run.stage2_classes)
        except ValueError as exc:
            raise RunError(f"{run.path / f'stage{n}.keras'}: {exc}") from exc

    calibration = None
    representative = {}
    if "int8" in variants:
        for size in sorted(set(sizes.values())):        # the same files (same seed) at each stage's size
            calibration = calib.select(run.rows(args.split_calibration), args.calibration, size, run.seed,
                                       split=args.split_calibration, resolve=run.resolve)
            representative[size], calibration.anchored = calib.anchor_input_range(calibration.images)
        for path, reason in calibration.skipped:
            log.warning("calibration: skipped %s: %s", path, reason)
        log.info("calibration: %d %s images (%s), seed %d%s", len(calibration.files), calibration.split,
                 ", ".join(f"{k}={v}" for k, v in calibration.per_class().items()), run.seed,
                 ", input range anchored to 0..255" if calibration.anchored else "")

    models: dict[str, dict[int, bytes]] = {}
    float_fallbacks: dict[str, list[str]] = {}
    for variant in variants:
        models[variant] = {}
        for stage in (1, 2):
            try:
                data = _quiet(export_tflite, parts[stage][0], variant,
                              representative[sizes[stage]] if variant == "int8" else None, args.dense_quantization)
            except Exception as exc:
                raise RuntimeError(f"Stage-{stage} {variant} conversion failed: {type(exc).__name__}: {exc}") from exc
            if variant == "int8":
                bad = float_ops(data)
                if bad:
                    float_fallbacks[f"stage{stage}"] = bad
                q = io_quantization(data)["input"]
                if q["dtype"] != "uint8" or q["scale"] != 1.0 or q["zero_point"] != 0:
                    raise ConvertError(f"Stage-{stage} int8 input is {q['dtype']} scale {q['scale']} zero_point "
                                       f"{q['zero_point']}; the edge feeds raw uint8 pixels (needs 1.0 / 0)")
            models[variant][stage] = data
            log.info("stage%d %-8s %8.1f KiB", stage, variant, len(data) / 1024)
        if float_fallbacks:   # checked before any other variant is converted: fail fast
            listing = "; ".join(f"{s}: {', '.join(ops)}" for s, ops in float_fallbacks.items())
            if not args.allow_float_ops:
                raise ConvertError(f"int8 graph has ops on float tensors ({listing}); these run in float on "
                                   "the board. Re-run with --allow-float-ops to accept them.")
            log.warning("int8 graph keeps float ops (accepted by --allow-float-ops): %s", listing)

    extra = {"source_run": str(run.path),
             "source": {k: run.info.get(k) for k in ("profile", "method", "weights", "weights_source", "created",
                                                     "split_csv") if k in run.info},
             "tools": tool_versions()}
    extra_files = {}
    if calibration is not None:
        extra["quantization"] = {"convolutions": "per-channel", "dense": args.dense_quantization}
        extra["calibration"] = calibration.record("calibration.txt")
        extra_files["calibration.txt"] = calibration.files_text()
        if float_fallbacks:
            extra["float_ops"] = float_fallbacks
    backbones = run.info.get("backbones") or {}
    bundle = write_bundle_v2(out, models, heads={n: parts[n][1] for n in (1, 2)},
                             backbone_names={n: str(backbones.get(f"stage{n}", "")) for n in (1, 2)},
                             taxonomy=run.taxonomy, stage2_classes=run.stage2_classes,
                             stage1_threshold=run.stage1_threshold, stage2_review_floor=run.stage2_review_floor,
                             extra=extra, extra_files=extra_files)
    finish_on_int8_features(bundle, run, args.threads, replay=not args.no_replay)
    log.info("bundle written: %s (%s)", bundle, ", ".join(variants))
    return bundle, run


def finish_on_int8_features(bundle_dir: Path, run: Run, threads: int, replay: bool) -> None:
    """What needs the bundle's own int8 backbones, computed as the board computes it:
    - the replay set: features of the run's train split (replay.npz), so adaptation keeps what the public
      data taught;
    - for stages trained with the frozen method (a numpy head on frozen features): the head refitted on the
      int8 features of the train split (the run's L2 strength) and, for Stage 1, the threshold recalibrated on
      the val split's int8 scores by the training rule. int8 features differ from float ones by a few percent,
      and a head fitted on float features would meet that as noise on the board."""
    import numpy as np

    from edge_runtime.adapt.derive import derive_bundle
    from edge_runtime.adapt.features import extract, replay_bytes, replay_description
    from edge_runtime.adapt.refit import fit_stage_head
    from edge_runtime.bundle import load_bundle
    from edge_runtime.digest import sha256_file
    from edge_runtime.evaluation import threshold_for_recall
    from edge_runtime.gate import stage1_score
    from edge_runtime.inspector import Inspector

    lambdas = run.info.get("head_lambda") or {}
    if not replay and not lambdas:
        return
    bundle = load_bundle(bundle_dir)
    inspector = Inspector(bundle, threads=threads)
    train, skipped = extract(inspector, [(run.resolve(p), label) for p, label in run.rows("train")])
    for path, reason in skipped:
        log.warning("int8 features: skipped %s: %s", path, reason)
    changes: dict = {}
    if lambdas:
        heads, fitted = {}, {}
        none = np.zeros(len(train), bool)
        for n in (1, 2):
            lam = lambdas.get(f"stage{n}")
            if lam is not None:
                heads[n] = fit_stage_head(bundle, n, list(bundle.stage_classes[n]), train, none, 1.0, float(lam))
                fitted[f"stage{n}"] = f"int8 features of the train split ({len(train)} images), lambda {lam:g}"
        changes.update(heads=heads, extra={"heads_fitted": fitted})
        if 1 in heads:
            val, _ = extract(inspector, [(run.resolve(p), label) for p, label in run.rows("val")])
            scores = stage1_score(heads[1].probs(val.stage1), heads[1].classes, bundle.clean_label)
            defective = np.array([x != bundle.clean_label for x in val.labels])
            target = float(run.info.get("target_defect_recall", 0.98))
            threshold = threshold_for_recall(scores[defective], target) if defective.any() else run.stage1_threshold
            changes["gating"] = {"stage1_threshold": threshold}
            log.info("int8 heads: %s; Stage-1 threshold %.4f on %d val images (float run: %.4f)",
                     ", ".join(fitted.values()), threshold, len(val), run.stage1_threshold)
    if replay:
        data = replay_bytes(train, bundle.taxonomy, [sha256_file(p) for p in train.paths])
        changes["replay"] = (data, replay_description(train, bundle.variant, "train split"))
        log.info("replay set: %d train images, %.1f MB (float16 features of both stages)", len(train),
                 len(data) / 2**20)
    derive_bundle(bundle, bundle_dir, **changes)


def _quiet(fn, *args):
    """The converter prints its SavedModel signature to stdout and a warning about input statistics
    (we set them through the representative dataset, on purpose); keep the log readable."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return fn(*args)


# ---- argument parsing ------------------------------------------------------------------------------------

def parse_convert(argv):
    p = argparse.ArgumentParser(
        prog="python -m convert", description="Convert a training run into an edge model bundle (TFLite).",
        epilog="Cross-compare an existing bundle: python -m convert compare --run runs/NAME --bundle models/NAME")
    p.add_argument("--run", required=True, metavar="runs/NAME", help="training run folder")
    p.add_argument("--out", metavar="models/NAME", help="bundle folder (default models/<run name>)")
    v = p.add_argument_group("variants (at least one)")
    v.add_argument("--int8", action="store_true", help="full-integer int8, uint8 pixel input (the deployed model)")
    v.add_argument("--fp16", action="store_true", help="float16 weights")
    v.add_argument("--dynamic", action="store_true", help="dynamic-range (int8 weights, float activations)")
    v.add_argument("--float32", action="store_true", help="plain float32 TFLite")
    p.add_argument("--calibration", type=int, default=200, metavar="N",
                   help="int8 calibration images from the train split, stratified by class (default 200)")
    p.add_argument("--dense-quantization", choices=DENSE_QUANTIZATION, default=DEFAULT_DENSE_QUANTIZATION,
                   help="int8 weights of dense (FULLY_CONNECTED) layers: per-tensor runs on every runtime, "
                        "tflite-runtime 2.14 included; per-channel needs a newer one (default "
                        f"{DEFAULT_DENSE_QUANTIZATION}; measurements in the README)")
    p.add_argument("--allow-float-ops", action="store_true",
                   help="accept an int8 graph in which some ops still run in float")
    p.add_argument("--no-compare", action="store_true", help="skip the float-vs-TFLite cross-compare")
    p.add_argument("--no-replay", action="store_true",
                   help="leave out the replay set (train-split features for adaptation, a few MB)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split the cross-compare evaluates on (default test)")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads for the cross-compare")
    args = p.parse_args(argv)
    args.split_calibration = "train"
    if not (args.int8 or args.fp16 or args.dynamic or args.float32):
        p.error("choose at least one variant: --int8, --fp16, --dynamic, --float32")
    if args.calibration < 1:
        p.error("--calibration must be at least 1")
    return args


def parse_compare(argv):
    p = argparse.ArgumentParser(
        prog="python -m convert compare",
        description="Float Keras models vs every TFLite variant of a bundle on a held-out split.")
    p.add_argument("--run", required=True, metavar="runs/NAME", help="training run folder (the float models)")
    p.add_argument("--bundle", required=True, metavar="models/NAME", help="bundle folder from python -m convert")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)")
    p.add_argument("--only", metavar="DIR", help="only the split's images under DIR (e.g. an `edge-inspect "
                                                 "export-labels` folder: then also the deployed bundle as recorded)")
    p.add_argument("--out", metavar="DIR", help="where compare.json/.md and PNGs go (default: the bundle folder)")
    p.add_argument("--threads", type=int, default=2, help="interpreter threads")
    return p.parse_args(argv)


def _fail(exc: Exception, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sign", "keygen", "derived"):     # no TensorFlow either (convert/sign.py)
        from convert.sign import main as sign_main
        return sign_main(argv)
    if argv and argv[0] == "check":          # edge_runtime only: runs where TensorFlow is not installed
        from convert.parity import main as check_main
        return check_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for noisy in ("tensorflow", "absl"):   # "Assets written to ..." per conversion
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from convert.calibration import CalibrationError
    from convert.compare import CompareError, compare_bundle

    if argv and argv[0] == "sensitivity":
        from convert.sensitivity import main as sensitivity_main
        return sensitivity_main(argv[1:])
    if argv and argv[0] == "compare":
        args = parse_compare(argv[1:])
        try:
            run = read_run(args.run)
            load_models(run)
            compare_bundle(run, args.bundle, split=args.split, out_dir=args.out, threads=args.threads,
                           only=args.only)
        except (RunError, CompareError) as exc:
            return _fail(exc, 2)
        return 0

    args = parse_convert(argv)
    try:
        bundle, run = convert_run(args)
    except (RunError, CalibrationError, ConvertError) as exc:
        return _fail(exc, 2)
    except RuntimeError as exc:
        return _fail(exc, 1)
    if args.no_compare:
        return 0
    try:
        compare_bundle(run, bundle, split=args.split, threads=args.threads)
    except CompareError as exc:
        print(f"bundle written to {bundle}, but the cross-compare failed", file=sys.stderr)
        return _fail(exc, 1)
    return 0
