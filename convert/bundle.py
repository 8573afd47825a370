"""Write a model bundle: the folder that is all the edge needs.

Layout:
    models/NAME/
        manifest.yaml           # read by edge_runtime.bundle (no TensorFlow needed)
        stage1.tflite           # int8 (the deployed default); other variants: stage1_<variant>.tflite
        stage2.tflite
        calibration.txt         # files used for int8 calibration, one per line (when int8 is present)

manifest.yaml (format sem-inspect-bundle/1):
    format: sem-inspect-bundle/1
    created: ISO-8601 UTC
    taxonomy: [clean, bridges, ...]          # the 8 classes, clean first
    stage2_classes: [bridges, ...]           # order of Stage-2 outputs
    input: {height: H, width: W, channels: 3, preprocessing: "grayscale->resize(bilinear)->uint8 HxWx3"}
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
    backbones: {stage1: densenet121, stage2: densenet121}
    source_run: /abs/path/runs/NAME
    calibration: {...}                       # int8 only: count, split, per-class counts, seed, files list file
    tools: {python, tensorflow, keras, ...}
    files: {calibration.txt: {sha256, bytes}}  # the other files written with the bundle (extra_files)

The folder is written to a temporary sibling and renamed into place, so a failed conversion never leaves a
half-written bundle behind and an existing bundle is replaced whole or not at all.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from convert.compat import runtime_needs
from convert.export import io_quantization, model_filename
from edge_runtime.bundle import FORMAT, MANIFEST
from edge_runtime.digest import sha256_bytes


def write_bundle(out_dir: str | os.PathLike, models: dict[str, dict[int, bytes]], *, taxonomy: list[str],
                 stage2_classes: list[str], image_size: int, stage1_threshold: float,
                 stage2_review_floor: float, backbones: dict[str, str] | None = None,
                 default_variant: str | None = None, extra: dict | None = None,
                 extra_files: dict[str, str | bytes] | None = None) -> Path:
    """models: {variant: {1: tflite bytes, 2: tflite bytes}}; extra_files: {name: text or bytes}, written
    next to the models and listed with their sha256 under `files`. Returns the bundle path."""
    out_dir = Path(out_dir).resolve()
    if not models:
        raise ValueError("no models to write")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    variants: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for variant, stages in models.items():
            variants[variant] = {}
            for stage in (1, 2):
                data = stages[stage]
                name = model_filename(stage, variant)
                (tmp / name).write_bytes(data)
                variants[variant][f"stage{stage}"] = {
                    "file": name, "sha256": sha256_bytes(data), "bytes": len(data), **io_quantization(data),
                    **runtime_needs(data).manifest()}
        files: dict[str, dict] = {}
        for name, content in (extra_files or {}).items():
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            (tmp / name).write_bytes(data)
            files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        manifest = {
            "format": FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "taxonomy": list(taxonomy),
            "stage2_classes": list(stage2_classes),
            "input": {"height": int(image_size), "width": int(image_size), "channels": 3,
                      "preprocessing": "grayscale -> resize(bilinear) -> uint8 HxWx3"},
            "gating": {"stage1_threshold": float(stage1_threshold),
                       "stage2_review_floor": float(stage2_review_floor)},
            "default_variant": default_variant or ("int8" if "int8" in models else next(iter(models))),
            "variants": variants,
            "backbones": dict(backbones or {}),
            **(extra or {}),
        }
        if files:
            manifest["files"] = files

        (tmp / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
        for f in tmp.iterdir():          # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
