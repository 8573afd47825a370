"""The watch service moves the very file it read: a file swapped in under the name between the check and the
rename (or, across file systems, between the copy and the unlink) never ends up in processed/ under another
image's result; it is put back and inspected as a new input. Real service process, real files; a launcher wraps
one function so the swap happens at that exact moment."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.images import png_bytes
from tests.support.paths import REPO
from tests.support.watch import rows

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


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def swap_while_moving(bundle: Path, tmp_path: Path, out: Path, hook: str, seeds: tuple[int, int]) -> dict:
    """Drop a.png, run `edge-inspect --watch --once` with `hook` swapping b.png in under its name at the hooked
    moment; check that every file in processed/ is its own row's image and the drop folder is empty. Returns
    {sha256: row} and the two images."""
    watch, spare = tmp_path / "incoming", tmp_path / "spare"
    watch.mkdir()
    spare.mkdir()
    first, second = png_bytes(seeds[0]), png_bytes(seeds[1])
    (watch / "a.png").write_bytes(first)
    (spare / "b.png").write_bytes(second)
    db = tmp_path / "r.sqlite3"
    cmd = [sys.executable, "-c", LAUNCHER, "--models", str(bundle), "--watch", str(watch),
           "--processed", str(out / "processed"), "--quarantine", str(out / "quarantine"), "--db", str(db),
           "--settle-seconds", "0.1", "--incomplete-seconds", "1", "--summary-seconds", "0", "--threads", "1",
           "--once"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HOOK": hook, "SWAP_TARGET": str(watch / "a.png"),
           "SWAP_WITH": str(spare / "b.png")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    recorded = rows(db)
    for path in (out / "processed").iterdir():
        (row,) = [r for r in recorded if r["dest_path"] == str(path)]
        assert row["sha256"] == sha(path.read_bytes()), f"{path.name} was moved under another image's result"
    assert os.listdir(watch) == [], (os.listdir(watch), proc.stderr[-2000:])
    by_sha = {r["sha256"]: r for r in recorded}
    assert Path(by_sha[sha(second)]["dest_path"]).read_bytes() == second
    return {"rows": by_sha, "first": sha(first), "second": sha(second)}


def test_a_file_swapped_in_between_check_and_rename_is_put_back_and_inspected_as_itself(tiny_bundle, tmp_path):
    got = swap_while_moving(tiny_bundle, tmp_path, tmp_path, SWAP_AFTER_CHECK, (1, 2))
    assert got["rows"][got["first"]]["state"] == "missing"      # read, then replaced before its move: gone
    assert got["rows"][got["second"]]["state"] == "done"        # the swapped-in file: its own row, moved


def other_file_system(near: Path) -> Path | None:
    for base in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(base) and os.access(base, os.W_OK) and os.stat(base).st_dev != os.stat(near).st_dev:
            return Path(tempfile.mkdtemp(dir=base, prefix="move-race-"))
    return None


def test_a_file_swapped_in_between_copy_and_unlink_across_file_systems_is_kept(tiny_bundle, tmp_path):
    out = other_file_system(tmp_path)
    if out is None:
        pytest.skip("no second writable file system here (/dev/shm or TMPDIR on another device)")
    try:
        got = swap_while_moving(tiny_bundle, tmp_path, out, SWAP_AFTER_COPY, (3, 4))
        assert got["rows"][got["first"]]["state"] == "done"     # its copy was in place before the swap
        assert got["rows"][got["second"]]["state"] == "done"    # not unlinked: inspected as itself
    finally:
        shutil.rmtree(out, ignore_errors=True)
