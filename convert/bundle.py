"""Write a model bundle: the folder that is all the edge needs (read by edge_runtime.bundle, no TensorFlow).

Format /2 (what `python -m convert` writes): each stage is a backbone and a head.
    models/NAME/
        manifest.yaml
        stage1.tflite, stage2.tflite     # int8 backbones: uint8 pixels -> pooled features (other variants:
                                         # stageN_<variant>.tflite)
        stage1_head.npz, stage2_head.npz # numpy heads: features -> probabilities (edge_runtime/head.py)
        replay.npz                       # optional: int8 features of the public training images, for adaptation
        calibration.txt                  # files used for int8 calibration

manifest.yaml:
    format: sem-inspect-bundle/2
    created: ISO-8601 UTC
    taxonomy: [clean, bridges, ...]          # the 8 classes, clean first
    stage2_classes: [bridges, ...]           # order of Stage-2 outputs
    input: {channels: 3, preprocessing: "grayscale -> resize(bilinear) -> uint8 HxWx3"}
    stages:                                  # what each stage is; its input size is its model's input shape
      stage1: {backbone: efficientnet_lite0, image_size: [160, 160], classes: [clean, ...] or [defective],
               head: {file, sha256, bytes, activations: [softmax]}}
      stage2: {backbone: ..., image_size: [224, 224], classes: [bridges, ...], head: {...}}
    gating: {stage1_threshold: t, stage2_review_floor: f}
    default_variant: int8
    variants:
      int8:
        stage1: {file, sha256, bytes, input: {name, shape, dtype, scale, zero_point}, output: {...},
                 ops: {CONV_2D: 3, ...},                  # builtin operators and their versions in the model
                 min_runtime: {litert: 1.0.1, tflite-runtime: 2.14.0, tensorflow: 2.14.0},
                 min_runtime_reason: "..."}               # oldest interpreters that run it (convert/compat.py);
                                                          # edge_runtime refuses older ones
        stage2: {...}
    replay: {file, sha256, bytes, images, per_class, variant}   # optional
    backbones: {stage1: ..., stage2: ...}
    source_run: /abs/path/runs/NAME
    calibration: {...}                       # int8 only: count, split, per-class counts, seed, files list file
    tools: {python, tensorflow, keras, ...}
    files: {calibration.txt: {sha256, bytes}}  # the other files written with the bundle (extra_files)
    parent, adapted: {...}                   # bundles made by adaptation: where they came from, on what data

Format /1 (write_bundle, still read everywhere; the first shipped bundle): one whole classifier per stage,
one `input: {height, width}` for both, no `stages`.

The folder is written to a temporary sibling and renamed into place (edge_runtime.bundle.write_bundle_dir),
so a failed conversion never leaves a half-written bundle behind and an existing bundle is replaced whole or
not at all.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from convert.compat import runtime_needs
from convert.export import io_quantization, model_filename
from edge_runtime.bundle import FORMAT, FORMAT_V1, REPLAY, file_entry, write_bundle_dir
from edge_runtime.head import Head

PREPROCESSING = "grayscale -> resize(bilinear) -> uint8 HxWx3"


def head_filename(stage: int) -> str:
    return f"stage{stage}_head.npz"


def _variants(models: dict[str, dict[int, bytes]], files: dict[str, bytes]) -> dict[str, dict]:
    """Each variant's stage entries (sha256, size, io quantization, ops and minimum runtimes); the model
    bytes go into `files`."""
    if not models:
        raise ValueError("no models to write")
    variants: dict[str, dict] = {}
    for variant, stages in models.items():
        variants[variant] = {}
        for stage in (1, 2):
            data = stages[stage]
            name = model_filename(stage, variant)
            files[name] = data
            variants[variant][f"stage{stage}"] = {"file": name, **file_entry(data), **io_quantization(data),
                                                  **runtime_needs(data).manifest()}
    return variants


def _extra_files(extra_files: dict[str, str | bytes] | None, files: dict[str, bytes]) -> dict[str, dict]:
    listed = {}
    for name, content in (extra_files or {}).items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        files[name] = data
        listed[name] = file_entry(data)
    return listed


def _header(fmt: str, taxonomy, stage2_classes, stage1_threshold: float, stage2_review_floor: float) -> dict:
    return {"format": fmt, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "taxonomy": list(taxonomy), "stage2_classes": list(stage2_classes),
            "gating": {"stage1_threshold": float(stage1_threshold), "stage2_review_floor": float(stage2_review_floor)}}


def write_bundle(out_dir: str | os.PathLike, models: dict[str, dict[int, bytes]], *, taxonomy: list[str],
                 stage2_classes: list[str], image_size: int, stage1_threshold: float,
                 stage2_review_floor: float, backbones: dict[str, str] | None = None,
                 default_variant: str | None = None, extra: dict | None = None,
                 extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Format /1: models = {variant: {1: tflite bytes, 2: tflite bytes}}, each a whole classifier (Stage 1 one
    sigmoid unit). extra_files: {name: text or bytes}, listed with their sha256 under `files`."""
    files: dict[str, bytes] = {}
    variants = _variants(models, files)
    listed = _extra_files(extra_files, files)
    manifest = {
        **_header(FORMAT_V1, taxonomy, stage2_classes, stage1_threshold, stage2_review_floor),
        "input": {"height": int(image_size), "width": int(image_size), "channels": 3,
                  "preprocessing": PREPROCESSING},
        "default_variant": default_variant or ("int8" if "int8" in models else next(iter(models))),
        "variants": variants,
        "backbones": dict(backbones or {}),
        **(extra or {}),
    }
    if listed:
        manifest["files"] = listed
    return write_bundle_dir(out_dir, files, manifest)


def stage_entry(stage: int, backbone: str, image_size: tuple[int, int], head: Head, head_bytes: bytes) -> dict:
    """A stage's description in a format-/2 manifest."""
    return {"backbone": backbone, "image_size": [int(image_size[0]), int(image_size[1])],
            "classes": list(head.classes),
            "head": {"file": head_filename(stage), **file_entry(head_bytes), "activations": list(head.activations)}}


def write_bundle_v2(out_dir: str | os.PathLike, backbones: dict[str, dict[int, bytes]], *, heads: dict[int, Head],
                    backbone_names: dict[int, str], taxonomy: list[str], stage2_classes: list[str],
                    stage1_threshold: float, stage2_review_floor: float, replay: dict | None = None,
                    default_variant: str | None = None, extra: dict | None = None,
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Format /2: backbones = {variant: {1: tflite bytes, 2: tflite bytes}} (pixels -> features), heads =
    {1: Head, 2: Head}; replay = {"bytes": npz bytes, **description} or None."""
    files: dict[str, bytes] = {}
    variants = _variants(backbones, files)
    first = variants[default_variant or ("int8" if "int8" in backbones else next(iter(backbones)))]
    stages = {}
    for stage in (1, 2):
        data = heads[stage].to_bytes()
        files[head_filename(stage)] = data
        shape = first[f"stage{stage}"]["input"]["shape"]
        stages[f"stage{stage}"] = stage_entry(stage, backbone_names[stage], (shape[1], shape[2]), heads[stage], data)
    listed = _extra_files(extra_files, files)
    manifest = {
        **_header(FORMAT, taxonomy, stage2_classes, stage1_threshold, stage2_review_floor),
        "input": {"channels": 3, "preprocessing": PREPROCESSING},
        "stages": stages,
        "default_variant": default_variant or ("int8" if "int8" in backbones else next(iter(backbones))),
        "variants": variants,
        "backbones": {f"stage{n}": name for n, name in backbone_names.items()},
        **(extra or {}),
    }
    if replay is not None:
        data = replay.pop("bytes")
        files[REPLAY] = data
        manifest["replay"] = {"file": REPLAY, **file_entry(data), **replay}
    if listed:
        manifest["files"] = listed
    return write_bundle_dir(out_dir, files, manifest)
