"""A finished training run's folder, read and checked: run.json, stage1.keras, stage2.keras and split.csv
(`python -m convert`, `convert sensitivity`, `train tta` and `compare` read runs through this)."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime import strict
from edge_runtime.classnames import CLASS, DEFECTIVE, ClassNameError, check_taxonomy

STAGE_FILES = {1: "stage1.keras", 2: "stage2.keras"}
_SIZE = strict.Number(low=8, integer=True)
# What run.json must hold (edge_runtime/strict.py); the rest (metrics, paths, settings) is informative and kept.
RUN_FIELDS = strict.Keys({
    "image_size": _SIZE,
    "image_sizes": strict.Field(strict.Keys({"stage1": strict.Field(_SIZE, None), "stage2": strict.Field(_SIZE, None)}),
                                None),
    "taxonomy": strict.ListOf(CLASS),
    "stage2_classes": strict.ListOf(CLASS),
    "stage1_classes": strict.Field(strict.ListOf(CLASS), None),
    "stage1_threshold": strict.Number(0, 1),
    "stage2_review_floor": strict.Number(0, 1),
}, extra="keep")


class RunError(ValueError):
    """The run folder cannot be converted: the message names the file and the problem."""


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
        """Stage 2's input size (runs from before per-stage sizes: both stages')."""
        return self.image_size_of(2)

    def image_size_of(self, stage: int) -> int:
        sizes = self.info.get("image_sizes") or {}
        return int(sizes.get(f"stage{stage}", self.info["image_size"]))

    @property
    def stage1_classes(self) -> list[str]:
        """What Stage 1 outputs: ["defective"] (one sigmoid unit) or taxonomy classes (softmax; P(defective) =
        1 - P(clean), edge_runtime.gate.stage1_score)."""
        return list(self.info.get("stage1_classes") or ["defective"])

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
    strict.read(info, RUN_FIELDS, str(info_path), error=RunError)
    taxonomy = info["taxonomy"]
    try:
        check_taxonomy(taxonomy, info["stage2_classes"], info.get("stage1_classes") or DEFECTIVE, str(info_path))
    except ClassNameError as exc:
        raise RunError(str(exc)) from None
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

    s1 = run.stage1_classes
    expected = {1: (1, "sigmoid") if s1 == ["defective"] else (len(s1), "softmax"),
                2: (len(run.stage2_classes), "softmax")}
    for stage, name in STAGE_FILES.items():
        size = run.image_size_of(stage)
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
            raise RunError(f"{file}: input shape {in_shape} does not match run.json image_size (Stage {stage}: "
                           f"expected (None, {size}, {size}, 3))")
        units, activation = expected[stage]
        out_shape = tuple(model.outputs[0].shape)
        if out_shape != (None, units):
            what = (f"one unit per stage1_classes {s1}" if stage == 1 and s1 != ["defective"] else
                    "one P(defective) unit" if stage == 1 else f"one unit per stage2_classes {run.stage2_classes}")
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
