"""Where the checkout and the real-data sets are."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def shared_data(name: str) -> Path:
    """Path of a real-data set, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real SEM data not available: {path} is absent (see ../shared/data/README.md)")
    return path
