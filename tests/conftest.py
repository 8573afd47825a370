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
                      stage1_threshold: float = 0.5, review_floor: float = 0.5, seed: int = 0) -> Path:
    """Two random-init tiny_cnn stages exported through the real converter and bundle writer."""
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
        models[variant] = {s: export_tflite(m, variant, rep if variant == "int8" else None)
                           for s, m in stage_models.items()}
    return write_bundle(out_dir, models, taxonomy=TAXONOMY, stage2_classes=TINY_STAGE2,
                        image_size=image_size, stage1_threshold=stage1_threshold,
                        stage2_review_floor=review_floor,
                        backbones={"stage1": "tiny_cnn", "stage2": "tiny_cnn"},
                        extra={"source_run": "tests", "tools": {}})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A read-only-by-convention tiny bundle (int8 + float32). Copy it before modifying."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


# Imports everything edge-inspect needs while still root (the interpreter and the tree may live where nobody
# cannot read, e.g. /root/.pyenv), then drops to nobody (65534) and runs the command.
UNPRIVILEGED = """
import os, sys
from PIL import Image
Image.init()
import edge_runtime.cli, edge_runtime.inspector
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
