"""Shared fixtures: tiny models and bundles built here, never downloaded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
TINY_SIZE = 32
TINY_STAGE2 = ["bridges", "cracks", "opens"]
TAXONOMY = ["clean", "bridges", "cracks", "opens", "shorts", "scratches", "vias", "other"]


def shared_data(name: str) -> Path:
    """Path of a real-data set, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real SEM data not available: {path} is absent (see ../shared/data/README.md)")
    return path


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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A read-only-by-convention tiny bundle (int8 + float32). Copy it before modifying."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle_per_channel(tmp_path_factory) -> Path:
    """The tiny bundle (int8 only) with per-channel dense layers: what tflite-runtime 2.14 must refuse."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny-pc", variants=("int8",), dense="per-channel")


@pytest.fixture(scope="session")
def tiny_bundle_v2(tmp_path_factory) -> Path:
    """A read-only-by-convention format-/2 bundle: Stage 1 at 24x24 over the 8 taxonomy classes, Stage 2 at
    32x32 (int8 backbones + numpy heads); its source_run holds the float stage models (stageN.keras). Copy it
    before modifying."""
    root = tmp_path_factory.mktemp("bundle")
    return build_tiny_bundle_v2(root / "tiny-v2", keras_run=root / "run")


TFLRT_VENV = REPO / ".venv-tflrt"      # made by `make setup-tflrt` (tflite-runtime 2.14 + numpy<2 + the project)


def tflite_runtime_python() -> str:
    """A Python with tflite-runtime 2.14 (and no LiteRT): $SEM_INSPECT_TFLRT_PYTHON or .venv-tflrt; else skip
    with the reason `make setup-tflrt` recorded (it has wheels for CPython 3.8-3.11, x86-64 and aarch64 only)."""
    import subprocess

    python = os.environ.get("SEM_INSPECT_TFLRT_PYTHON") or str(TFLRT_VENV / "bin" / "python")
    if not Path(python).exists():
        reason = TFLRT_VENV / ".unavailable"
        pytest.skip(f"tflite-runtime is not installed here: {reason.read_text().strip()}" if reason.is_file() else
                    f"no tflite-runtime environment ({python} is missing): run `make setup-tflrt`")
    probe = subprocess.run([python, "-c", "import tflite_runtime; print(tflite_runtime.__version__)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import tflite_runtime: {(probe.stderr.strip().splitlines() or [''])[-1]}")
    return python


# Imports everything edge-inspect needs while still root (the interpreter and the tree may live where nobody
# cannot read, e.g. /root/.pyenv), then drops to nobody (65534) and runs the command.
UNPRIVILEGED = """
import os, sys
from PIL import Image
Image.init()
import edge_runtime.cli, edge_runtime.inspector, edge_runtime.service.watch
from edge_runtime.interpreter import load_backend
load_backend()
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(edge_runtime.cli.main(sys.argv[1:]))
"""


def run_unprivileged(argv: list[str]) -> tuple[int, str]:
    """edge-inspect ARGV in a fresh process that has dropped to an unprivileged user, so that file permissions
    apply even when the tests run as root (CI does)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", UNPRIVILEGED, *argv], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the whole session (benchmarks/pgserver.py), or skip with the reason it
    cannot start here. Tests that need an empty database call postgres_server.create_database()."""
    from benchmarks.pgserver import PostgresServer, PostgresUnavailable, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no PostgreSQL server: {reason}")
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        pytest.skip(f"PostgreSQL could not start here: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """The URL of the session's PostgreSQL server's `postgres` database (shared by the tests: use
    postgres_server.create_database() for a database of one's own)."""
    return postgres_server.url
