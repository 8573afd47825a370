"""deploy/: the shipped systemd unit (parsed as systemd reads it, and checked with systemd-analyze verify), and
install.sh run as a command."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "sem-inspect.service"
INSTALL = DEPLOY / "install.sh"


def unit_entries(text: str) -> dict[str, list[str]]:
    """systemd unit -> {"Section.Key": [values in order]} (keys may repeat, e.g. SystemCallFilter)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def one(entries, key) -> str:
    assert key in entries, f"{key} missing from the unit"
    return entries[key][-1]


def system_python() -> str | None:
    """A Python 3.11/3.12 outside home folders with venv support, as install.sh requires for the service."""
    for candidate in ("/usr/bin/python3.12", "/usr/bin/python3.11", "/usr/local/bin/python3.11",
                      "/usr/bin/python3"):
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; "
                                "sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)) "
                                "or sys.base_prefix.startswith(('/root/', '/home/')))"], capture_output=True)
        if probe.returncode == 0:
            return candidate
    return None


def verifiable_unit(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it), as install.sh
    renders it for another --prefix."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    exe = venv_bin / "edge-inspect"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit = unit_dir / "sem-inspect.service"
    unit.write_text(text.replace("/opt/sem-inspect/venv", str(tmp_path / "venv")))
    return unit


def verify_unit(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)


def run_install(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout)
