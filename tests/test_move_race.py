"""The watch service moves the very file it read: a file swapped in under the name between the check and the
rename (or, across file systems, between the copy and the unlink) never ends up in processed/ under another
image's result; it is put back and inspected as a new input. Real service process, real files; a launcher wraps
one function so the swap happens at that exact moment."""
from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import REPO

LAUNCHER = """
import os, runpy, sys
exec(os.environ["HOOK"])
sys.argv = ["edge-inspect", *sys.argv[1:]]
runpy.run_module("edge_runtime.cli", run_name="__main__")
"""

# Right after the name was checked, before it is renamed: another file is renamed over it.
SWAP_AFTER_CHECK = """
import os
from edge_runtime.service import fileops as _f
_target, _with, _done = os.environ["SWAP_TARGET"], os.environ["SWAP_WITH"], []
_check = _f._check
def _hooked(path, expect):
    _check(path, expect)
    if not _done and os.fspath(path) == _target:
        _done.append(1)
        os.rename(_with, _target)
_f._check = _hooked
"""

# Across file systems: right after the copy is renamed into place, before the source is unlinked.
SWAP_AFTER_COPY = """
import os
_target, _with, _done, _rename = os.environ["SWAP_TARGET"], os.environ["SWAP_WITH"], [], os.rename
def _hooked(src, dst, *a, **k):
    _rename(src, dst, *a, **k)
    if not _done and os.fspath(src).endswith(".partial"):
        _done.append(1)
        _rename(_with, _target)
os.rename = _hooked
"""


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 46), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def results(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM results ORDER BY id")]
    finally:
        con.close()


def run_service_once(bundle: Path, watch: Path, out: Path, db: Path, hook: str, env: dict) -> str:
    cmd = [sys.executable, "-c", LAUNCHER, "--models", str(bundle), "--watch", str(watch),
           "--processed", str(out / "processed"), "--quarantine", str(out / "quarantine"), "--db", str(db),
           "--settle-seconds", "0.1", "--incomplete-seconds", "1", "--summary-seconds", "0", "--threads", "1",
           "--once"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HOOK": hook, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def check_every_moved_file_is_its_rows_image(processed: Path, recorded: list[dict]) -> None:
    for path in processed.iterdir():
        (row,) = [r for r in recorded if r["dest_path"] == str(path)]
        assert row["sha256"] == sha(path.read_bytes()), f"{path.name} was moved under another image's result"


def test_a_file_swapped_in_between_check_and_rename_is_put_back_and_inspected_as_itself(tiny_bundle, tmp_path):
    watch, spare = tmp_path / "incoming", tmp_path / "spare"
    watch.mkdir()
    spare.mkdir()
    first, second = png(1), png(2)
    (watch / "a.png").write_bytes(first)
    (spare / "b.png").write_bytes(second)
    log = run_service_once(tiny_bundle, watch, tmp_path, tmp_path / "r.sqlite3", SWAP_AFTER_CHECK,
                           {"SWAP_TARGET": str(watch / "a.png"), "SWAP_WITH": str(spare / "b.png")})
    recorded = results(tmp_path / "r.sqlite3")
    check_every_moved_file_is_its_rows_image(tmp_path / "processed", recorded)
    by_sha = {r["sha256"]: r for r in recorded}
    assert by_sha[sha(first)]["state"] == "missing", recorded     # read, then replaced before its move: gone
    assert by_sha[sha(second)]["state"] == "done", recorded       # the swapped-in file: its own row, moved
    assert Path(by_sha[sha(second)]["dest_path"]).read_bytes() == second
    assert os.listdir(watch) == [], (os.listdir(watch), log[-2000:])


def other_file_system(near: Path) -> Path | None:
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base) and os.access(base, os.W_OK) and os.stat(base).st_dev != os.stat(near).st_dev:
            return Path(tempfile.mkdtemp(dir=base, prefix="move-race-"))
    return None


def test_a_file_swapped_in_between_copy_and_unlink_across_file_systems_is_kept(tiny_bundle, tmp_path):
    out = other_file_system(tmp_path)
    if out is None:
        pytest.skip("no second writable file system here (/dev/shm or TMPDIR on another device)")
    watch, spare = tmp_path / "incoming", tmp_path / "spare"
    watch.mkdir()
    spare.mkdir()
    first, second = png(3), png(4)
    (watch / "a.png").write_bytes(first)
    (spare / "b.png").write_bytes(second)
    try:
        log = run_service_once(tiny_bundle, watch, out, tmp_path / "r.sqlite3", SWAP_AFTER_COPY,
                               {"SWAP_TARGET": str(watch / "a.png"), "SWAP_WITH": str(spare / "b.png")})
        recorded = results(tmp_path / "r.sqlite3")
        check_every_moved_file_is_its_rows_image(out / "processed", recorded)
        by_sha = {r["sha256"]: r for r in recorded}
        assert by_sha[sha(first)]["state"] == "done", recorded     # its copy was in place before the swap
        assert by_sha[sha(second)]["state"] == "done", recorded    # not unlinked: inspected as itself
        assert Path(by_sha[sha(second)]["dest_path"]).read_bytes() == second
        assert os.listdir(watch) == [], (os.listdir(watch), log[-2000:])
    finally:
        import shutil
        shutil.rmtree(out, ignore_errors=True)
