"""The edge runtime never needs TensorFlow.

1. In `.venv-edge` (created by `make setup-edge`: only the `edge` extras, no TensorFlow installed), an
   Inspector run and the CLI work, and TensorFlow is neither imported nor importable.
2. In the main environment (where TensorFlow is installed), the runtime still works when every
   `import tensorflow` is made to fail by a meta-path blocker.
3. The code a board runs parses as Python 3.10 (the oldest the edge supports, JetPack 6); 3.11-3.13 run it in
   the arm64 smoke test (Debian 12 / 13 roots) and the x86 suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.paths import REPO

EDGE_PYTHON = REPO / ".venv-edge" / "bin" / "python"

INSPECT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    {prelude}
    from edge_runtime.inspector import Inspector
    import edge_runtime.cli, edge_runtime.service.watch, edge_runtime.service.recorder, edge_runtime.db.store
    import edge_runtime.review.server, edge_runtime.review.export_labels
    insp = Inspector(sys.argv[1], threads=1)
    img = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    result = insp.inspect(img).to_dict()
    rc = edge_runtime.cli.main(["--models", sys.argv[1], "--json", sys.argv[2]])
    print(json.dumps({{"result": result, "rc": rc,
                      "tf_loaded": sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")),
                      "backend": type(insp.stage1.interpreter).__module__}}))
""")

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class _BlockTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"blocked by test: {name}")
            return None
    sys.meta_path.insert(0, _BlockTensorFlow())
""")


def _run(python, prelude, tiny_bundle, tmp_path):
    from PIL import Image
    import numpy as np
    img = tmp_path / "a.png"
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(img)
    script = INSPECT_SCRIPT.format(prelude=prelude)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", script, str(tiny_bundle), str(img)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not EDGE_PYTHON.exists(),
                    reason=".venv-edge is missing: create it with `make setup-edge` (edge extras only)")
def test_edge_venv_runs_without_tensorflow(tiny_bundle, tmp_path):
    probe = subprocess.run([str(EDGE_PYTHON), "-c", "import tensorflow"], capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr, \
        "TensorFlow must not be installed in the edge-only environment"
    out = _run(EDGE_PYTHON, "", tiny_bundle, tmp_path)
    assert out["tf_loaded"] == []
    assert out["rc"] == 0
    assert out["backend"].startswith("ai_edge_litert")
    assert out["result"]["label"] in ("clean", "bridges", "cracks", "opens")


def test_runtime_works_with_tensorflow_blocked(tiny_bundle, tmp_path):
    out = _run(sys.executable, BLOCKER, tiny_bundle, tmp_path)
    assert out["tf_loaded"] == []
    assert out["rc"] == 0
    assert out["result"]["label"] in ("clean", "bridges", "cracks", "opens")


EDGE_CODE = sorted((REPO / "edge_runtime").glob("*.py")) + [REPO / "convert" / "parity_worker.py"]


@pytest.mark.parametrize("path", EDGE_CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_edge_code_is_python_3_10(path):
    """ast's feature_version rejects grammar newer than 3.10 (except*, PEP 695 type parameters, ...)."""
    import ast

    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))


def test_the_3_10_check_would_catch_newer_syntax():
    import ast

    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
