"""Shared fixtures: tiny models and bundles built here, never downloaded; servers the tests start themselves.
Helpers that are not fixtures live in tests/support/ (imported as tests.support.*; pyproject.toml's pytest
section puts the checkout on the path)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from tests.support.bundles import build_tiny_bundle, build_tiny_bundle_v2  # noqa: E402
from tests.support.mosquitto import Broker  # noqa: E402
from tests.support.postgres import start_postgres  # noqa: E402
from tests.support.runs import convert_run  # noqa: E402


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


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the whole session (benchmarks/pgserver.py), or skip with the reason it
    cannot start here. Tests that need an empty database call postgres_server.create_database()."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """The URL of the session's PostgreSQL server's `postgres` database (shared by the tests: use
    postgres_server.create_database() for a database of one's own)."""
    return postgres_server.url


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict:
    """A tiny trained run converted with `--int8 --float32` (tests.support.runs), built once per session:
    {root, run, bundle, stdout}. Read-only by convention."""
    return convert_run(tmp_path_factory.mktemp("convert"))


@pytest.fixture
def broker(tmp_path):
    """A private Mosquitto for one test (anonymous clients allowed), or skip where it is not installed."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def folders(tmp_path):
    """The watch service's folders and files under tmp_path (only the drop folder exists yet)."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return {"watch": incoming, "processed": tmp_path / "processed", "quarantine": tmp_path / "quarantine",
            "db": tmp_path / "results.sqlite3", "jsonl": tmp_path / "results.jsonl"}
