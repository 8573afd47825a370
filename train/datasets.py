"""Read a prepared split (split.csv) and derive the per-stage views used by training.

split.csv is written by `python -m train prepare` (train/prepare.py) with the columns `path,label,split`.
Stage views:
  stage1  -> every image, labelled "clean" or "defective" (Stage 1 is a binary clean-vs-defect model)
  stage2  -> only the defect images, with their defect class (Stage 2 never sees clean images)
  master  -> every image with its 8-class label
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from train.config import Config

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "split")
VIEWS = ("stage1", "stage2", "master")
DEFECTIVE = "defective"


class SplitError(ValueError):
    """split.csv is missing, malformed, or holds a label/split outside the taxonomy."""


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: str
    split: str


def _taxonomy_classes(config: Config | None) -> list[str]:
    if config is None:
        from train.config import load_config
        config = load_config()
    return config.taxonomy.classes


def read_split(csv_path: str | Path, config: Config | None = None) -> list[Sample]:
    """Load split.csv into Samples; labels are checked against the taxonomy (default config if none given)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SplitError(f"split file not found: {csv_path} (create it with `python -m train prepare`)")
    classes = set(_taxonomy_classes(config))
    samples: list[Sample] = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header != COLUMNS:
            raise SplitError(f"{csv_path}: columns must be exactly {','.join(COLUMNS)}; "
                             f"got {','.join(header) or 'none'}")
        for line_no, row in enumerate(reader, start=2):
            path, label, split = (row.get(c) for c in COLUMNS)
            if not path or not label or not split:
                raise SplitError(f"{csv_path}:{line_no}: empty field in {row}")
            if label not in classes:
                raise SplitError(f"{csv_path}:{line_no}: label {label!r} is not a taxonomy class {sorted(classes)}")
            if split not in SPLITS:
                raise SplitError(f"{csv_path}:{line_no}: split {split!r} must be one of {SPLITS}")
            samples.append(Sample(path=path, label=label, split=split))
    if not samples:
        raise SplitError(f"{csv_path}: no rows")
    return samples


def stage_view(samples: list[Sample], view: str, clean_label: str = "clean") -> list[tuple[str, str]]:
    """(path, label) pairs for one stage: stage1 = clean/defective, stage2 = defects only, master = all."""
    if view == "master":
        return [(s.path, s.label) for s in samples]
    if view == "stage1":
        return [(s.path, clean_label if s.label == clean_label else DEFECTIVE) for s in samples]
    if view == "stage2":
        return [(s.path, s.label) for s in samples if s.label != clean_label]
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def by_split(samples: list[Sample], split: str) -> list[Sample]:
    """The samples of one split (train|val|test)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [s for s in samples if s.split == split]


# ---- ingestion: find the images of one source folder and their labels ---------------------------------
# Layouts:
#   master    SOURCE/CLASS/*
#   presplit  SOURCE/{train,val,test}/CLASS/*  (case and spelling variants below); the splits are noted
#             but not used: prepare re-splits everything group-aware so near duplicates cannot leak.
#   notebook  SOURCE/stage1_binary_dataset/{Train,Validation,Test}/{clean,defective}/*
#           + SOURCE/stage2_multiclass_dataset/{Train,Validation,Test}/CLASS/*
#             clean images come from stage 1, defect classes from stage 2 (stage-1 "defective" folders hold
#             the same images without a defect class, so they are not used as labelled data).
SPLIT_ALIASES = {"train": "train", "training": "train",
                 "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test", "testing": "test"}
NOTEBOOK_STAGE1 = "stage1_binary_dataset"
NOTEBOOK_STAGE2 = "stage2_multiclass_dataset"
STAGE1_DEFECT_NAMES = ("defect", "defects", "defective", "defected", "anomaly", "anomalous", "bad", "ng", "faulty")


class DatasetError(ValueError):
    """A --data folder cannot be used (missing, empty, or with folder names that map to no class)."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str              # absolute
    label: str | None      # taxonomy class; None for stage-1 "defective" files of the notebook layout
    folder: str            # the class folder name as found on disk
    origin_split: str | None   # split named by a pre-split/notebook source (informational only)
    part: str = ""         # notebook layout: "stage1" or "stage2"


@dataclasses.dataclass
class SourceScan:
    root: str
    layout: str
    files: list[SourceFile]
    unsupported: list[str]            # files with a suffix the decoder does not take
    stray: list[str]                  # files outside any class folder
    folders: dict[str, str | None]    # folder name -> class (None = stage-1 defective)
    origin_splits: list[str]


def _visible_dirs(path: Path) -> list[Path]:
    # Hidden folders and macOS archive debris are not class folders.
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def _visible_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    """'notebook', 'presplit' or 'master' from the folder names directly under `root`."""
    names = {d.name.lower() for d in _visible_dirs(root)}
    if NOTEBOOK_STAGE1 in names or NOTEBOOK_STAGE2 in names:
        return "notebook"
    if names and all(n in SPLIT_ALIASES for n in names):
        return "presplit"
    return "master"


def _split_dirs(root: Path) -> list[tuple[str, Path]]:
    out = []
    for d in _visible_dirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is None:
            raise DatasetError(f"{d}: expected only split folders (train/val/test and variants) beside it, "
                               f"found {d.name!r}")
        out.append((split, d))
    return out


def _unmapped_error(root: Path, unmapped: dict[str, list[str]], config: Config) -> DatasetError:
    lines = [f"{root}: folder name(s) that map to no class of the taxonomy {config.taxonomy.classes}:"]
    for name, where in sorted(unmapped.items()):
        lines.append(f"  - {name!r} (in {', '.join(sorted(set(where)))})")
    lines.append("Map each one by adding an alias to the config's `aliases:` section, for example:")
    lines.append("  aliases:")
    for name in sorted(unmapped):
        lines.append(f'    "{name.lower()}": <one of {", ".join(config.taxonomy.classes)}>')
    lines.append("and pass it with --config FILE.")
    return DatasetError("\n".join(lines))


def source_folder(path: str | Path) -> Path:
    """A --data argument as an absolute folder, or a DatasetError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"--data folder not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"--data is not a folder: {path}")
    return path.resolve()


def scan_source(root: str | Path, config: Config) -> SourceScan:
    """List the images of one source folder with their labels. Reads names only, never writes."""
    root = source_folder(root)
    layout = detect_layout(root)
    # (split, part, class dir) triples
    class_dirs: list[tuple[str | None, str, Path]] = []
    stray = [str(p) for p in _visible_files(root)]
    if layout == "master":
        class_dirs = [(None, "", d) for d in _visible_dirs(root)]
    elif layout == "presplit":
        for split, sd in _split_dirs(root):
            stray += [str(p) for p in _visible_files(sd)]
            class_dirs += [(split, "", d) for d in _visible_dirs(sd)]
    else:
        for part_name, part in ((NOTEBOOK_STAGE1, "stage1"), (NOTEBOOK_STAGE2, "stage2")):
            part_dir = next((d for d in _visible_dirs(root) if d.name.lower() == part_name), None)
            if part_dir is None:
                continue
            stray += [str(p) for p in _visible_files(part_dir)]
            for split, sd in _split_dirs(part_dir):
                stray += [str(p) for p in _visible_files(sd)]
                class_dirs += [(split, part, d) for d in _visible_dirs(sd)]

    folders: dict[str, str | None] = {}
    unmapped: dict[str, list[str]] = {}
    for _split, part, d in class_dirs:
        label = config.map_label(d.name)
        if part == "stage1" and label != config.taxonomy.clean:
            if d.name.lower() in STAGE1_DEFECT_NAMES or label is not None:
                label = None          # stage-1 defect folder: its images carry their class in stage 2
            else:
                unmapped.setdefault(d.name, []).append(str(d.relative_to(root)))
                continue
        elif label is None:
            unmapped.setdefault(d.name, []).append(str(d.relative_to(root)))
            continue
        folders[d.name] = label
    if unmapped:
        raise _unmapped_error(root, unmapped, config)

    from edge_runtime.preprocess import is_supported
    files: list[SourceFile] = []
    unsupported: list[str] = []
    for split, part, d in class_dirs:
        label = folders[d.name]
        for p in sorted(d.rglob("*")):
            if not p.is_file() or any(s.startswith(".") for s in p.relative_to(d).parts):
                continue
            if not is_supported(p):
                unsupported.append(str(p))
                continue
            files.append(SourceFile(path=str(p), label=label, folder=d.name, origin_split=split, part=part))
    if not files:
        found = "no class folders" if not class_dirs else "no supported images in its class folders"
        raise DatasetError(f"--data folder {root} holds no usable images ({found}; layout '{layout}'; "
                           f"expected CLASS/*.png, train|val|test/CLASS/*, or the notebook layout)")
    origin_splits = sorted({s for s, _p, _d in class_dirs if s})
    return SourceScan(root=str(root), layout=layout, files=files, unsupported=unsupported, stray=stray,
                      folders=folders, origin_splits=origin_splits)
