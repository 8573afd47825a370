"""edge-inspect as an unprivileged user, so that file permissions apply even when the tests run as root (CI
does)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.support.paths import REPO

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
    """edge-inspect ARGV in a fresh process that has dropped to an unprivileged user: (exit code, stderr)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", UNPRIVILEGED, *argv], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    return proc.returncode, proc.stderr
