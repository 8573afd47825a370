"""Load and validate the project configuration (configs/default.yaml).

Validation is strict on purpose: a typo in a key must stop a run, not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path
from typing import Annotated

import yaml

from edge_runtime import strict
from edge_runtime.classnames import CLASS, ClassNameError, check_taxonomy
from edge_runtime.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
BACKBONES = ("densenet121", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v3_small",
             "tiny_cnn")


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or holds an unknown key or wrong type (edge_runtime/strict.py)."""


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    clean: Annotated[str, CLASS]
    defects: list[Annotated[str, CLASS]]

    @property
    def classes(self) -> list[str]:
        """The 8-class order used everywhere: clean first, then the defects."""
        return [self.clean, *self.defects]


@dataclasses.dataclass(frozen=True)
class Split:
    train: float
    val: float
    test: float


@dataclasses.dataclass(frozen=True)
class Audit:
    near_duplicate_correlation: Annotated[float, strict.Number(above=0, high=1)]
    # The runtime's decode limits (edge_runtime/preprocess.py) are the default and the most: an image the board
    # would refuse is no image to train or calibrate on.
    max_image_pixels: Annotated[int, strict.Number(integer=True, above=0, high=DEFAULT_MAX_PIXELS)] = DEFAULT_MAX_PIXELS
    max_file_bytes: Annotated[int, strict.Number(integer=True, above=0, high=DEFAULT_MAX_BYTES)] = DEFAULT_MAX_BYTES


@dataclasses.dataclass(frozen=True)
class Gating:
    target_defect_recall: Annotated[float, strict.Number(above=0, high=1)]
    stage2_review_floor: float


@dataclasses.dataclass(frozen=True)
class StageModel:
    dense_units: int
    dropout: float


@dataclasses.dataclass(frozen=True)
class Models:
    stage1: StageModel
    stage2: StageModel


STAGE1_TARGETS = ("binary", "taxonomy")
METHODS = ("finetune", "frozen")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """What one stage overrides in a profile (empty / 0: the profile's own value)."""
    backbone: str = ""
    image_size: int = 0
    method: str = ""
    features: str = ""
    # Stage 1 only: "binary" (clean vs defective) or "taxonomy" (all 8 classes; P(defective) = 1 - P(clean),
    # which separates better when clean images share patterns with the defect classes).
    target: str = "binary"


@dataclasses.dataclass(frozen=True)
class Profile:
    backbone: str
    image_size: int
    max_images_per_class: int
    batch_size: int
    epochs_frozen: int
    epochs_finetune: int
    lr_frozen: float
    lr_finetune: float
    finetune_blocks: int
    patience: int
    # finetune: Keras training of the whole stage model (two phases); frozen: features of the frozen
    # pretrained backbone and a logistic-regression head fitted in numpy (edge_runtime/adapt/fit.py, the code
    # adaptation uses), in seconds.
    method: str = "finetune"
    # The features the head reads: gap (global average of the last map) or mid (average + max pooling of
    # EfficientNet-Lite's block-5 and block-6 outputs; train/models.py)
    features: str = "gap"
    # The Stage-1 threshold's defect recall on val; 0 = gating.target_defect_recall
    target_defect_recall: float = 0.0
    stage1: StageSettings = dataclasses.field(default_factory=StageSettings)
    stage2: StageSettings = dataclasses.field(default_factory=StageSettings)

    def backbone_of(self, stage: int) -> str:
        return getattr(self, f"stage{stage}").backbone or self.backbone

    def image_size_of(self, stage: int) -> int:
        return getattr(self, f"stage{stage}").image_size or self.image_size

    def method_of(self, stage: int) -> str:
        return getattr(self, f"stage{stage}").method or self.method

    def features_of(self, stage: int) -> str:
        return getattr(self, f"stage{stage}").features or self.features


@dataclasses.dataclass(frozen=True)
class Config:
    taxonomy: Taxonomy
    aliases: dict[str, str]
    image_size: int
    seed: int
    split: Split
    audit: Audit
    gating: Gating
    models: Models
    profiles: dict[str, Profile]

    # ---- label mapping -------------------------------------------------------------------
    def map_label(self, folder_name: str) -> str | None:
        """Map a dataset folder name to a taxonomy class, or None when nothing matches."""
        name = normalise_name(folder_name)
        classes = self.taxonomy.classes
        if name in classes:
            return name
        for candidate in (name + "s", name + "es", name[:-1] if name.endswith("s") else None):
            if candidate and candidate in classes:
                return candidate
        for pattern, target in self.aliases.items():
            if fnmatch.fnmatchcase(name, normalise_name(pattern)):
                return target
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalise_name(name: str) -> str:
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


def _validate_values(cfg: Config) -> None:
    classes = cfg.taxonomy.classes
    try:        # the taxonomy rule (edge_runtime/classnames.py): Stage 2 tells every defect class apart
        check_taxonomy(classes, cfg.taxonomy.defects)
    except ClassNameError as exc:
        raise ConfigError(str(exc)) from None
    for pattern, target in cfg.aliases.items():
        if target not in classes:
            raise ConfigError(f"aliases.{pattern}: maps to {target!r}, which is not a taxonomy class {classes}")
    total = cfg.split.train + cfg.split.val + cfg.split.test
    if abs(total - 1.0) > 1e-6 or min(cfg.split.train, cfg.split.val, cfg.split.test) <= 0:
        raise ConfigError(f"split: fractions must be positive and sum to 1 (got {total:.3f})")
    if not 0.0 <= cfg.gating.stage2_review_floor < 1.0:
        raise ConfigError("gating.stage2_review_floor: must be in [0, 1)")
    for name, p in cfg.profiles.items():
        for key, backbone in (("backbone", p.backbone), ("stage1.backbone", p.stage1.backbone),
                              ("stage2.backbone", p.stage2.backbone)):
            if backbone and backbone not in BACKBONES:
                raise ConfigError(f"profiles.{name}.{key}: {backbone!r} is not one of {BACKBONES}")
        if min(p.image_size_of(1), p.image_size_of(2)) < 32 or p.batch_size < 1:
            raise ConfigError(f"profiles.{name}: image_size must be >= 32 and batch_size >= 1")
        if not 0.0 <= p.target_defect_recall <= 1.0:
            raise ConfigError(f"profiles.{name}.target_defect_recall: must be in (0, 1], or 0 for the gating default")
        for n in (1, 2):
            features = p.features_of(n)
            if features not in ("gap", "mid") or (features == "mid" and not p.backbone_of(n).startswith(
                    "efficientnet_lite")):
                raise ConfigError(f"profiles.{name}: stage-{n} features {features!r} must be gap, or mid with an "
                                  "EfficientNet-Lite backbone")
            if p.method_of(n) not in METHODS:
                raise ConfigError(f"profiles.{name}.method: {p.method_of(n)!r} (stage {n}) is not one of {METHODS}")
        if p.stage1.target not in STAGE1_TARGETS or p.stage2.target != "binary":
            raise ConfigError(f"profiles.{name}: stage1.target must be one of {STAGE1_TARGETS} (stage2 has none)")
    if cfg.image_size < 32:
        raise ConfigError("image_size: must be >= 32")


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = strict.read(data, Config, source, error=ConfigError)
    _validate_values(cfg)
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_dict(data, str(path))
