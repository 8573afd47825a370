"""Tiny bundles built here, never downloaded: random-init tiny_cnn stages exported through the real converter
and bundle writer (format /1, int8 and float32; format /2, int8 backbones with numpy heads), and what tests
read back from a model file."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import yaml

TINY_SIZE = 32
TINY_STAGE2 = ["bridges", "cracks", "opens"]
TAXONOMY = ["clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other"]


def build_tiny_bundle(out_dir: Path, variants=("int8", "float32"), image_size: int = TINY_SIZE,
                      stage1_threshold: float = 0.5, review_floor: float = 0.5, seed: int = 0,
                      dense: str | None = None) -> Path:
    """Two random-init tiny_cnn stages exported through the real converter and bundle writer (int8 dense layers
    as `dense` says, default the converter's)."""
    import keras

    from convert.bundle import write_bundle
    from convert.export import export_tflite
    from train.models import build_stage_model

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    rep = rng.integers(0, 256, (8, image_size, image_size, 3), dtype=np.uint8)
    rep[0, 0, 0] = 0
    rep[0, 0, 1] = 255
    models = {}
    stage_models = {1: build_stage_model(1, backbone="tiny_cnn", image_size=image_size, num_classes=1),
                    2: build_stage_model(2, backbone="tiny_cnn", image_size=image_size,
                                         num_classes=len(TINY_STAGE2))}
    for variant in variants:
        models[variant] = {s: export_tflite(m, variant, rep if variant == "int8" else None,
                                            **({"dense": dense} if dense else {}))
                           for s, m in stage_models.items()}
    return write_bundle(out_dir, models, taxonomy=TAXONOMY, stage2_classes=TINY_STAGE2,
                        image_size=image_size, stage1_threshold=stage1_threshold,
                        stage2_review_floor=review_floor,
                        backbones={"stage1": "tiny_cnn", "stage2": "tiny_cnn"},
                        extra={"source_run": "tests", "tools": {}})


TINY_V2_SIZES = {1: 24, 2: 32}         # Stage 1 smaller than Stage 2, as a cheap gate would be


def build_tiny_bundle_v2(out_dir: Path, sizes: dict[int, int] = TINY_V2_SIZES, stage1_classes=TAXONOMY,
                         stage1_threshold: float = 0.5, review_floor: float = 0.5, seed: int = 0,
                         keras_run: Path | None = None, replay_images: int = 48) -> Path:
    """A format-/2 bundle (int8 only) made the way `python -m convert` makes one: per stage a random-init
    tiny_cnn backbone (pixels -> pooled features, its own input size) exported int8, and a one-layer numpy head
    with random weights over standardised features (Stage 1 over `stage1_classes`: the 8 taxonomy classes by
    default, P(defective) = 1 - P(clean)). keras_run: also save the float stage models there (stageN.keras,
    backbone + the head folded into one Dense layer), for the Keras path of the benchmarks. replay_images: a
    replay set of that many synthetic images (0: none), for adaptation."""
    import keras

    from convert.bundle import write_bundle_v2
    from convert.export import export_tflite
    from edge_runtime.head import Head
    from train.models import feature_extractor, with_dense_head

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    backbones, heads = {}, {}
    for n, classes in ((1, tuple(stage1_classes)), (2, tuple(TINY_STAGE2))):
        size = sizes[n]
        # flat gray levels from black to white plus noise: features that vary from image to image
        levels = np.linspace(0, 255, 8)[:, None, None, None]
        rep = np.clip(levels + rng.normal(0, 20, (8, size, size, 1)), 0, 255).astype(np.uint8).repeat(3, axis=3)
        rep[0, 0, 0], rep[0, 0, 1] = 0, 255
        extractor = feature_extractor("tiny_cnn", size, None)
        feats = extractor.predict(rep.astype(np.float32), verbose=0)
        width = feats.shape[1]
        units = 1 if classes == ("defective",) else len(classes)
        heads[n] = Head(feats.mean(axis=0), feats.std(axis=0) + 1e-3,
                        [(rng.normal(0, 2 / np.sqrt(width), (width, units)), rng.normal(0, 0.1, units))],
                        ["sigmoid" if units == 1 else "softmax"], classes)
        backbones[n] = export_tflite(extractor, "int8", rep)
        if keras_run is not None:
            keras_run.mkdir(parents=True, exist_ok=True)
            with_dense_head(extractor, heads[n], f"stage{n}_tiny_cnn").save(keras_run / f"stage{n}.keras")
    out = write_bundle_v2(out_dir, {"int8": backbones}, heads=heads, backbone_names={1: "tiny_cnn", 2: "tiny_cnn"},
                          taxonomy=TAXONOMY, stage2_classes=TINY_STAGE2, stage1_threshold=stage1_threshold,
                          stage2_review_floor=review_floor,
                          extra={"source_run": str(keras_run) if keras_run else "tests", "tools": {}})
    if replay_images:
        add_replay(out, replay_images, rng)
    return out


def add_replay(bundle_dir: Path, n: int, rng: np.random.Generator) -> None:
    """A replay set as convert adds one: n synthetic images (labels cycling over the taxonomy) through the
    bundle's own int8 backbones, with their content hashes."""
    import hashlib

    from edge_runtime.adapt.derive import derive_bundle
    from edge_runtime.adapt.features import extract, replay_bytes, replay_description
    from edge_runtime.bundle import load_bundle
    from edge_runtime.inspector import Inspector

    bundle = load_bundle(bundle_dir)
    items = [(rng.integers(0, 256, (40, 40), dtype=np.uint8), TAXONOMY[k % len(TAXONOMY)]) for k in range(n)]
    features, _ = extract(Inspector(bundle, threads=1), items)
    digests = [hashlib.sha256(img.tobytes()).hexdigest() for img, _ in items]   # in-memory images: their pixels
    derive_bundle(bundle, bundle_dir, replay=(replay_bytes(features, bundle.taxonomy, digests),
                                              replay_description(features, bundle.variant, "tests")))


def weight_scales(data: bytes, op_name: str) -> list[int]:
    """Number of weight scales of every `op_name`, as the model file has them. Read with TFLite's built-in
    kernels: LiteRT's default XNNPACK delegate rewrites a per-tensor weight's quantization in place into one
    scale per output channel (measured: a per-tensor [32, 8] dense weight then shows 32 scales), which is how
    per-tensor dense layers looked per-channel when inspected through LiteRT's defaults."""
    from edge_runtime.interpreter import make_interpreter

    interp = make_interpreter(model_content=data, num_threads=1, kernels="builtin")
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    return [len(tensors[op["inputs"][1]]["quantization_parameters"]["scales"])
            for op in interp._get_ops_details() if op["op_name"] == op_name]


def fc_weight_scales(data: bytes) -> list[int]:
    return weight_scales(data, "FULLY_CONNECTED")


def conv_weight_scales(data: bytes) -> list[int]:
    return weight_scales(data, "CONV_2D")


def copy_bundle(src: Path, dst: Path, **gating) -> Path:
    """A private copy of a bundle, optionally with edited gating (the sha256s cover the model files only)."""
    shutil.copytree(src, dst)
    if gating:
        manifest_path = dst / "manifest.yaml"
        manifest = yaml.safe_load(manifest_path.read_text())
        manifest["gating"].update(gating)
        manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dst
