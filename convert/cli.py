"""python -m convert --int8 --run runs/NAME [...]   and   python -m convert compare --run runs/NAME --bundle models/NAME
(and `python -m convert sensitivity --run runs/NAME`: which layers lose the most to int8, convert/sensitivity.py;
`python -m convert check BUNDLE --images DIR`: the same answers on every runtime?, convert/parity.py)

Convert: read a training run (run.json, stage1.keras, stage2.keras, split.csv), check that the Keras files
are our two stages, calibrate int8 on N train-split images, export the requested variants, refuse float
fallbacks in the int8 graph, write the bundle (atomically: temp folder + rename), then cross-compare.

Exit codes: 0 ok; 2 bad input (missing/corrupt run, not our stage model, empty calibration set, float ops in
the int8 graph, bad arguments); 1 a conversion or comparison that failed for another reason.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import importlib.metadata
import json
import logging
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path


from convert.export import DEFAULT_DENSE_QUANTIZATION, DENSE_QUANTIZATION

log = logging.getLogger("convert")

STAGE_FILES = {1: "stage1.keras", 2: "stage2.keras"}
RUN_FIELDS = {"image_size": int, "taxonomy": list, "stage2_classes": list, "stage1_threshold": (int, float),
              "stage2_review_floor": (int, float)}


class RunError(ValueError):
    """The run folder cannot be converted: the message names the file and the problem."""


class ConvertError(ValueError):
    """The converted model is not what the edge needs (e.g. float ops in the int8 graph)."""


@dataclass
class Run:
    path: Path
    info: dict
    samples: list[tuple[str, str, str]]             # (path as written, label, split)
    split_csv: Path
    seed: int
    models: dict[int, object] = field(default_factory=dict)   # stage -> keras.Model, once loaded

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def taxonomy(self) -> list[str]:
        return list(self.info["taxonomy"])

    @property
    def clean_label(self) -> str:
        return self.taxonomy[0]

    @property
    def stage2_classes(self) -> list[str]:
        return list(self.info["stage2_classes"])

    @property
    def stage1_threshold(self) -> float:
        return float(self.info["stage1_threshold"])

    @property
    def stage2_review_floor(self) -> float:
        return float(self.info["stage2_review_floor"])

    def resolve(self, path: str) -> Path:
        """split.csv paths: absolute as written; relative ones as training read them (from the working
        folder), else next to the original split.csv, else inside the run folder."""
        p = Path(path)
        if p.is_absolute():
            return p
        candidates = [Path.cwd() / p]
        if self.info.get("split_csv"):
            candidates.append(Path(self.info["split_csv"]).parent / p)
        candidates.append(self.path / p)
        return next((c for c in candidates if c.exists()), candidates[0])

    def rows(self, split: str) -> list[tuple[str, str]]:
        return [(p, lab) for p, lab, s in self.samples if s == split]


# ---- reading and checking a run --------------------------------------------------------------------------

def read_run(run_dir: str | os.PathLike) -> Run:
    """run.json + split.csv, checked. The Keras files are checked to exist here and loaded by load_models."""
    path = Path(run_dir).resolve()
    if not path.is_dir():
        raise RunError(f"run folder not found: {run_dir}")
    info_path = path / "run.json"
    if not info_path.is_file():
        raise RunError(f"{info_path}: missing (not a training run folder? expected run.json, stage1.keras, "
                       "stage2.keras, split.csv)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{info_path}: not valid JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise RunError(f"{info_path}: expected a JSON object")
    for key, kind in RUN_FIELDS.items():
        if key not in info:
            raise RunError(f"{info_path}: missing field {key!r}")
        if isinstance(info[key], bool) or not isinstance(info[key], kind):
            raise RunError(f"{info_path}: field {key!r} has the wrong type ({type(info[key]).__name__})")
    taxonomy = info["taxonomy"]
    if len(taxonomy) < 2 or len(set(taxonomy)) != len(taxonomy) or not all(isinstance(c, str) for c in taxonomy):
        raise RunError(f"{info_path}: taxonomy must be a list of unique class names, clean first")
    stage2 = info["stage2_classes"]
    if not stage2 or any(c not in taxonomy[1:] for c in stage2) or len(set(stage2)) != len(stage2):
        raise RunError(f"{info_path}: stage2_classes {stage2} must be distinct defect classes of {taxonomy[1:]}")
    if info["image_size"] < 8:
        raise RunError(f"{info_path}: image_size {info['image_size']} is too small")
    for key in ("stage1_threshold", "stage2_review_floor"):
        if not 0.0 <= float(info[key]) <= 1.0:
            raise RunError(f"{info_path}: {key} must be in [0, 1], got {info[key]}")
    for stage, name in STAGE_FILES.items():
        if not (path / name).is_file():
            raise RunError(f"{path / name}: missing (the run has no Stage-{stage} model)")
    split_csv = path / "split.csv"
    samples = read_split_csv(split_csv, taxonomy)
    return Run(path=path, info=info, samples=samples, split_csv=split_csv, seed=run_seed(path, info))


def read_split_csv(csv_path: Path, taxonomy: list[str]) -> list[tuple[str, str, str]]:
    if not csv_path.is_file():
        raise RunError(f"{csv_path}: missing (the run's copy of the split)")
    rows = []
    try:
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != ("path", "label", "split"):
                raise RunError(f"{csv_path}: columns must be path,label,split; got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                p, label, split = row.get("path"), row.get("label"), row.get("split")
                if not p or label not in taxonomy or split not in ("train", "val", "test"):
                    raise RunError(f"{csv_path}:{line}: bad row {row} (label must be one of {taxonomy}, "
                                   "split one of train/val/test)")
                rows.append((p, label, split))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RunError(f"{csv_path}: unreadable: {exc}") from exc
    if not rows:
        raise RunError(f"{csv_path}: no rows")
    return rows


def run_seed(path: Path, info: dict) -> int:
    """The run's seed: run.json, else the resolved config.yaml, else the project default config."""
    if isinstance(info.get("seed"), int):
        return int(info["seed"])
    import yaml

    try:
        resolved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        seed = (resolved.get("run") or {}).get("seed", (resolved.get("config") or resolved).get("seed"))
        if isinstance(seed, int):
            return seed
    except (OSError, AttributeError, yaml.YAMLError):
        pass
    from train.config import load_config

    return load_config().seed


def load_models(run: Run) -> dict[int, object]:
    """Load both Keras files and check they are our stages (input (None,H,W,3), Stage 1 one sigmoid unit,
    Stage 2 one softmax unit per stage2_classes entry)."""
    import keras

    size = run.image_size
    expected = {1: (1, "sigmoid"), 2: (len(run.stage2_classes), "softmax")}
    for stage, name in STAGE_FILES.items():
        file = run.path / name
        try:
            model = keras.saving.load_model(file, compile=False)
        except Exception as exc:  # zip/h5/json/deserialisation errors all mean the same thing here
            raise RunError(f"{file}: not a readable Keras model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise RunError(f"{file}: expected one input and one output, got {len(model.inputs)}/{len(model.outputs)}")
        in_shape = tuple(model.inputs[0].shape)
        if in_shape != (None, size, size, 3):
            raise RunError(f"{file}: input shape {in_shape} does not match run.json image_size "
                           f"(expected (None, {size}, {size}, 3))")
        units, activation = expected[stage]
        out_shape = tuple(model.outputs[0].shape)
        if out_shape != (None, units):
            what = "one P(defective) unit" if stage == 1 else f"one unit per stage2_classes {run.stage2_classes}"
            raise RunError(f"{file}: output shape {out_shape} is not a Stage-{stage} model "
                           f"(expected (None, {units}): {what})")
        act = _output_activation(model)
        if act != activation:
            raise RunError(f"{file}: output activation {act!r} is not a Stage-{stage} model (expected {activation})")
        run.models[stage] = model
    return run.models


def _output_activation(model) -> str | None:
    layer = model.layers[-1]
    act = layer.get_config().get("activation") if hasattr(layer, "get_config") else None
    if isinstance(act, dict):  # serialised activation object
        act = act.get("config", {}).get("name") or act.get("class_name")
    return act if isinstance(act, str) else getattr(getattr(layer, "activation", None), "__name__", None)


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
    from convert.bundle import write_bundle
    from convert.export import export_tflite, float_ops, io_quantization

    variants = [v for v, on in (("int8", args.int8), ("float16", args.fp16), ("dynamic", args.dynamic),
                                ("float32", args.float32)) if on]
    run = read_run(args.run)
    out = Path(args.out or Path("models") / run.name).resolve()
    if out == run.path or run.path in out.parents:
        raise RunError(f"--out {out} is inside the run folder; choose another folder (default models/{run.name})")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.yaml").is_file())):
        # write_bundle replaces the folder whole: never let that swallow something that is not a bundle
        raise RunError(f"--out {out} exists and is not a model bundle; refusing to replace it")
    load_models(run)
    log.info("run %s: image %dx%d, Stage-2 classes %s, threshold %.4f, review floor %.2f",
             run.path, run.image_size, run.image_size, run.stage2_classes, run.stage1_threshold,
             run.stage2_review_floor)

    calibration = None
    representative = None
    if "int8" in variants:
        calibration = calib.select(run.rows(args.split_calibration), args.calibration, run.image_size, run.seed,
                                   split=args.split_calibration, resolve=run.resolve)
        for path, reason in calibration.skipped:
            log.warning("calibration: skipped %s: %s", path, reason)
        representative, calibration.anchored = calib.anchor_input_range(calibration.images)
        log.info("calibration: %d %s images (%s), seed %d%s", len(calibration.files), calibration.split,
                 ", ".join(f"{k}={v}" for k, v in calibration.per_class().items()), run.seed,
                 ", input range anchored to 0..255" if calibration.anchored else "")

    models: dict[str, dict[int, bytes]] = {}
    float_fallbacks: dict[str, list[str]] = {}
    for variant in variants:
        models[variant] = {}
        for stage in (1, 2):
            try:
                data = _quiet(export_tflite, run.models[stage], variant,
                              representative if variant == "int8" else None, args.dense_quantization)
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
             "source": {k: run.info.get(k) for k in ("profile", "weights", "weights_source", "created", "split_csv")
                        if k in run.info},
             "tools": tool_versions()}
    extra_files = {}
    if calibration is not None:
        extra["quantization"] = {"convolutions": "per-channel", "dense": args.dense_quantization}
        extra["calibration"] = calibration.record("calibration.txt")
        extra_files["calibration.txt"] = calibration.files_text()
        if float_fallbacks:
            extra["float_ops"] = float_fallbacks
    bundle = write_bundle(out, models, taxonomy=run.taxonomy, stage2_classes=run.stage2_classes,
                          image_size=run.image_size, stage1_threshold=run.stage1_threshold,
                          stage2_review_floor=run.stage2_review_floor,
                          backbones=run.info.get("backbones") or {}, extra=extra, extra_files=extra_files)
    log.info("bundle written: %s (%s)", bundle, ", ".join(variants))
    return bundle, run


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
