"""A Python with tflite-runtime 2.14 (the interpreter many board images have) and no LiteRT."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import REPO

TFLRT_VENV = REPO / ".venv-tflrt"      # made by `make setup-tflrt` (tflite-runtime 2.14 + numpy<2 + the project)


def tflite_runtime_python() -> str:
    """A Python with tflite-runtime 2.14 (and no LiteRT): $SEM_INSPECT_TFLRT_PYTHON or .venv-tflrt; else skip
    with the reason `make setup-tflrt` recorded (it has wheels for CPython 3.8-3.11, x86-64 and aarch64 only)."""
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
