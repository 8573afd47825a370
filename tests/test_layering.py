"""The allowed import directions (pyproject.toml [tool.importlinter], docs/architecture.md) hold, and a change
that breaks one of them fails: each contract is shown failing on a copy of the tree with one violating import."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("edge_runtime", "train", "convert", "benchmarks", "central")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy's packages, not the editable install's, are the ones analysed.
    env = {**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1"}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_layering_contracts_are_kept():
    res = lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(contract_names())} kept, 0 broken" in res.stdout, res.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layering")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def contract_names() -> dict[str, str]:
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c["name"] for c in cfg["tool"]["importlinter"]["contracts"]}


# (file to add an import to, the import, the id of the contract that must then be reported broken)
VIOLATIONS = [
    ("edge_runtime/gate.py", "from edge_runtime.service import watch", "runtime-minimal"),
    ("edge_runtime/inspector.py", "from edge_runtime.db import store", "runtime-minimal"),
    ("edge_runtime/preprocess.py", "import tensorflow", "edge-no-training"),
    ("edge_runtime/review/reviews.py", "import train.report", "edge-no-training"),
    ("edge_runtime/fleet/publisher.py", "from edge_runtime.service import watch", "edge-layers"),
    ("edge_runtime/db/store.py", "from edge_runtime.review import reviews", "edge-layers"),
    ("edge_runtime/service/watch.py", "from edge_runtime.review import server", "edge-layers"),
    ("train/tta.py", "import convert.cli", "projects"),
    ("edge_runtime/fleet/publisher.py", "import central.collector", "projects"),   # a board never imports it
    ("central/api.py", "import train.report", "projects"),
    ("central/queries.py", "from edge_runtime.config import service_config", "central-wire-only"),
    ("central/collector.py", "from edge_runtime.db import store", "central-wire-only"),
    ("edge_runtime/netnames.py", "from edge_runtime.config import service_config", "runtime-minimal"),
    ("benchmarks/worker.py", "from edge_runtime.service import watch", "benchmarks-runtime-only"),
    ("convert/sensitivity.py", "from convert import cli", "no-cycles"),
]


@pytest.mark.parametrize("path, line, contract", VIOLATIONS, ids=[f"{p}:{l}" for p, l, _ in VIOLATIONS])
def test_a_violating_import_fails_the_check(tree_copy, path, line, contract):
    target = tree_copy / path
    original = target.read_text(encoding="utf-8")
    try:
        target.write_text(original + f"\n{line}  # deliberate violation\n", encoding="utf-8")
        res = lint(tree_copy)
    finally:
        target.write_text(original, encoding="utf-8")
    flat = " ".join(res.stdout.split())      # contract names wrap at the terminal width
    assert res.returncode != 0, flat
    assert f"{contract_names()[contract]} BROKEN" in flat, flat


def test_the_one_off_path_loads_only_the_runtime(tiny_bundle, tmp_path):
    """`edge-inspect --models B IMAGE` imports the runtime, the CLI and the config's flag definitions: no watch
    service, store, fleet or review code."""
    from PIL import Image

    img = tmp_path / "w.png"
    Image.new("L", (40, 40), 128).save(img)
    code = ("import sys, json; from edge_runtime.cli import main; rc = main(['--models', sys.argv[1], '--json', "
            "sys.argv[2]]); print(json.dumps(sorted(m for m in sys.modules if m.startswith('edge_runtime'))), "
            "file=sys.stderr); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_bundle), str(img)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(img)
    loaded = set(json.loads(res.stderr.strip().splitlines()[-1]))
    allowed_packages = {"edge_runtime", "edge_runtime.config"}
    outside = {m for m in loaded if m.rsplit(".", 1)[0] not in allowed_packages}
    assert not outside, f"the one-off path loaded {sorted(outside)}"
    assert "edge_runtime.inspector" in loaded and "edge_runtime.cli" in loaded


@pytest.mark.parametrize("old, new", [("edge_runtime.collect", "central"),
                                      ("edge_runtime.collect.api", "central.api"),
                                      ("edge_runtime.collect.rollout", "central.rollout")])
def test_the_old_central_commands_still_run_with_a_deprecation_line(old, new):
    res = subprocess.run([sys.executable, "-m", old, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"python -m {old} is deprecated" in res.stderr and f"use python -m {new}" in res.stderr
    assert "usage:" in res.stdout
