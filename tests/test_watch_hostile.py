"""`edge-inspect --watch` against hostile folders (issue 11): each case with real files and a real service process.

Where a case needs something to happen at one exact moment inside the service (a file swapped for a FIFO right
before it is opened, an image renamed over right after it was read), the service runs through a launcher that
wraps one function to do that at that moment; everything else is the real command on real files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.images import png_bytes
from tests.support.paths import REPO
from tests.support.unprivileged import run_unprivileged
from tests.support.waiting import wait_until
from tests.support.watch import files_in, jsonl_rows, rows

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

# Runs edge-inspect with one function wrapped (HOOK, from the environment) to act at an exact moment.
LAUNCHER = """
import os, runpy, sys
exec(os.environ["HOOK"])
sys.argv = ["edge-inspect", *sys.argv[1:]]
runpy.run_module("edge_runtime.cli", run_name="__main__")
"""


@pytest.fixture
def folders(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return {"watch": incoming, "processed": tmp_path / "processed", "quarantine": tmp_path / "quarantine",
            "db": tmp_path / "results.sqlite3", "jsonl": tmp_path / "results.jsonl", "log": tmp_path / "service.log"}


def service_cmd(bundle, folders, *extra, launcher: bool = False) -> list[str]:
    """The service's command line; `extra` flags come last and override (argparse keeps the last value)."""
    head = [sys.executable, "-c", LAUNCHER] if launcher else [sys.executable, "-m", "edge_runtime.cli"]
    return [*head, "--models", str(bundle), "--watch", str(folders["watch"]),
            "--processed", str(folders["processed"]), "--quarantine", str(folders["quarantine"]),
            "--db", str(folders["db"]), "--jsonl", str(folders["jsonl"]), "--settle-seconds", "0.1",
            "--incomplete-seconds", "1", "--summary-seconds", "0", "--threads", "1", *extra]


def run_once(bundle, folders, *extra, timeout: float = 90, hook: str | None = None,
             env: dict | None = None) -> tuple[int, str]:
    """`edge-inspect --watch ... --once` to the end: (exit status, its log). A hang fails the test."""
    cmd = service_cmd(bundle, folders, "--once", *extra, launcher=hook is not None)
    env = {**ENV, **(env or {}), **({"HOOK": hook} if hook else {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the service hung (no exit within {timeout} s):\n"
                    f"{(exc.stderr or b'').decode(errors='replace')[-3000:]}")
    log = proc.stderr.decode(errors="replace")
    with open(folders["log"], "a") as fh:
        fh.write(log)
    return proc.returncode, log


class Service:
    """A long-running `edge-inspect --watch` process (stopped with SIGTERM on exit)."""

    def __init__(self, bundle, folders, *extra):
        self.log_path = folders["log"]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(service_cmd(bundle, folders, *extra), stdout=self.log_file,
                                     stderr=self.log_file, cwd=REPO, env=ENV)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "Service":
        wait_until(lambda: "watching" in self.log or self.proc.poll() is not None, 240, lambda: self.log)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def by_name(db: Path) -> dict[str, dict]:
    return {r["name"]: r for r in rows(db)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]


# --------------------------------------------------------------------------------------------------------------
# 1. names that are not UTF-8
# --------------------------------------------------------------------------------------------------------------
def test_1_name_that_is_not_utf8_is_recorded_once_and_never_crashes(tiny_bundle, folders):
    w = folders["watch"]
    odd = os.fsdecode(b"wafer \xff\xfe.png")
    (w / odd).write_bytes(png_bytes(1))
    (w / "ok.png").write_bytes(png_bytes(2))
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    assert_no_traceback(log)
    recorded = by_name(folders["db"])
    assert set(recorded) == {"wafer \\xff\\xfe.png", "ok.png"}
    row = recorded["wafer \\xff\\xfe.png"]
    assert row["outcome"] == "inspected" and row["sha256"] == sha(png_bytes(1))
    name_bytes = b"wafer \xff\xfe.png"
    assert row["key"] == f"{sha(png_bytes(1))}//{name_bytes.hex()}"     # the exact bytes of the name
    assert (folders["processed"] / "wafer \\xff\\xfe.png").read_bytes() == png_bytes(1)
    folders["jsonl"].read_bytes().decode("utf-8")                 # strictly valid UTF-8
    assert sorted(j["name"] for j in jsonl_rows(folders["jsonl"])) == sorted(recorded)
    # The same file dropped again is recognised by its key (not recorded twice); a restart finds nothing to redo.
    (w / odd).write_bytes(png_bytes(1))
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0 and len(rows(folders["db"])) == 2 and files_in(w) == set(), log


def test_1_one_off_json_with_a_name_that_is_not_utf8_is_valid_utf8_and_round_trips(tiny_bundle, tmp_path):
    odd = tmp_path / os.fsdecode(b"lot \xff\xfe.png")
    odd.write_bytes(png_bytes(3))
    env = {**ENV, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}      # a strict UTF-8 stdout
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(tiny_bundle), "--json",
                           "--threads", "1", str(tmp_path)], capture_output=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    (line,) = proc.stdout.decode("utf-8").splitlines()            # strictly valid UTF-8
    assert os.fsencode(json.loads(line)["path"]) == os.fsencode(str(odd))     # the exact name comes back


# --------------------------------------------------------------------------------------------------------------
# 2. long names
# --------------------------------------------------------------------------------------------------------------
def test_2_long_names_get_short_enough_destinations_and_their_reason_file(tiny_bundle, folders):
    w = folders["watch"]
    long_name = "L" * 246 + ".png"             # 250 bytes: fits, but not with a hash suffix or ".reason.txt"
    bad_name = "B" * 246 + ".png"
    (w / long_name).write_bytes(png_bytes(1))
    (w / bad_name).write_bytes(b"not an image at all")
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    (w / long_name).write_bytes(png_bytes(2))  # the same name again, other content: needs a distinct name
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    assert_no_traceback(folders["log"].read_text())
    recorded = rows(folders["db"])
    assert sorted(r["name"] for r in recorded) == sorted([long_name, long_name, bad_name])
    for r in recorded:
        dest = Path(r["dest_path"])
        assert dest.is_file() and len(os.fsencode(dest.name)) <= 255 - len(".reason.txt"), dest.name
    kept = {sha(Path(r["dest_path"]).read_bytes()) for r in recorded if r["outcome"] == "inspected"}
    assert kept == {sha(png_bytes(1)), sha(png_bytes(2))}
    (bad,) = [r for r in recorded if r["outcome"] == "quarantined"]
    note = Path(bad["dest_path"] + ".reason.txt")
    assert "not an image" in note.read_text()


# --------------------------------------------------------------------------------------------------------------
# 3. decoder exceptions of any type
# --------------------------------------------------------------------------------------------------------------
def tiff_with_float_strip_offsets(seed: int) -> bytes:
    """A valid TIFF whose StripOffsets tag is retyped as FLOAT: Pillow raises TypeError decoding it."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 30), dtype=np.uint8)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:         # StripOffsets
            struct.pack_into("<H", data, entry + 2, 11)             # type LONG -> FLOAT
    return bytes(data)


def test_3_any_decoder_exception_quarantines_that_file_and_the_service_goes_on(tiny_bundle, folders):
    w = folders["watch"]
    with pytest.raises(TypeError):              # the files below really make Pillow raise TypeError
        Image.open(io.BytesIO(tiff_with_float_strip_offsets(0))).load()
    bad = [f"fuzzed {i:02d}.tif" for i in range(12)]
    for i, name in enumerate(bad):                  # 12 in a row, then good ones
        (w / name).write_bytes(tiff_with_float_strip_offsets(i))
        os.utime(w / name, ns=(10**18 + i, 10**18 + i))    # oldest first: handled before the good ones
    for i in range(3):
        (w / f"good {i}.png").write_bytes(png_bytes(i))
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    recorded = by_name(folders["db"])
    assert set(recorded) == set(bad) | {f"good {i}.png" for i in range(3)}
    for name in bad:
        assert recorded[name]["outcome"] == "quarantined" and "TypeError" in recorded[name]["reason"], recorded[name]
        assert (folders["quarantine"] / (name + ".reason.txt")).is_file()
    assert all(recorded[f"good {i}.png"]["outcome"] == "inspected" for i in range(3))
    assert files_in(w) == set()


# --------------------------------------------------------------------------------------------------------------
# 4. a FIFO swapped in: never blocks
# --------------------------------------------------------------------------------------------------------------
SWAP_FOR_FIFO = """
import builtins, io, os
_target, _done = os.environ["SWAP_TARGET"], []
def _swap(path):
    if not _done and isinstance(path, (str, os.PathLike)) and os.fspath(path) == _target:
        _done.append(1)
        os.unlink(_target)
        os.mkfifo(_target)          # swapped after the readiness checks, just before the service opens it
_open, _os_open = builtins.open, os.open
def _hooked_open(file, *args, **kwargs):
    _swap(file)
    return _open(file, *args, **kwargs)
def _hooked_os_open(path, *args, **kwargs):
    _swap(path)
    return _os_open(path, *args, **kwargs)
builtins.open = io.open = _hooked_open
os.open = _hooked_os_open
"""


def test_4_fifo_swapped_in_before_open_does_not_hang_and_is_quarantined(tiny_bundle, folders):
    w = folders["watch"]
    (w / "swap.png").write_bytes(png_bytes(1))
    (w / "good.png").write_bytes(png_bytes(2))
    rc, log = run_once(tiny_bundle, folders, hook=SWAP_FOR_FIFO, env={"SWAP_TARGET": str(w / "swap.png")},
                       timeout=60)
    assert rc == 0, log
    recorded = by_name(folders["db"])
    assert recorded["good.png"]["outcome"] == "inspected"
    assert recorded["swap.png"]["outcome"] == "quarantined"
    assert recorded["swap.png"]["reason"] == "not a regular file (FIFO)"
    assert (folders["quarantine"] / "swap.png.reason.txt").is_file()
    assert files_in(w) == set() and not (w / "swap.png").exists()


def test_4_fifo_in_place_of_a_model_file_is_a_clear_setup_error(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "stage1.tflite").unlink()
    os.mkfifo(bundle / "stage1.tflite")
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(1))
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(bundle), str(img)],
                              capture_output=True, text=True, cwd=REPO, env=ENV, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("bundle loading hung on a FIFO")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"edge-inspect: error: {bundle / 'stage1.tflite'}: cannot read model file: not a regular file (FIFO)"]


# --------------------------------------------------------------------------------------------------------------
# 5. the watch folder deleted and re-created around the database
# --------------------------------------------------------------------------------------------------------------
def test_5_watch_folder_recreated_with_the_database_inside_stops_with_exit_2(tiny_bundle, folders):
    w = folders["watch"]
    db_inside = w / ".edge-inspect.sqlite3"
    with Service(tiny_bundle, folders, "--db", str(db_inside), "--rescan-seconds", "0.3") as svc:
        (w / "a.png").write_bytes(png_bytes(1))
        wait_until(lambda: files_in(folders["processed"]) == {"a.png"}, 120, lambda: svc.log)
        shutil.rmtree(w)
        w.mkdir()
        (w / "b.png").write_bytes(png_bytes(2))
        wait_until(lambda: svc.proc.poll() is not None, 80, lambda: "still running:\n" + svc.log)
        assert svc.proc.returncode == 2, svc.log
    assert "deleted and re-created" in svc.log
    assert (w / "b.png").read_bytes() == png_bytes(2)          # not taken, not "moved"
    assert files_in(folders["processed"]) == {"a.png"}
    assert "b.png" not in svc.log


# --------------------------------------------------------------------------------------------------------------
# 6. a file replaced after it was read, before it is moved
# --------------------------------------------------------------------------------------------------------------
REPLACE_AFTER_READ = """
import os
import edge_runtime.inspector as _m
_target, _with, _done = os.environ["SWAP_TARGET"], os.environ["SWAP_WITH"], []
_inspect = _m.Inspector.inspect
def _hooked_inspect(self, source, path=None):
    result = _inspect(self, source, path)
    if not _done and path is not None and os.fspath(path) == _target:
        _done.append(1)
        os.rename(_with, _target)   # renamed over it after it was read, before its result is committed
    return result
_m.Inspector.inspect = _hooked_inspect
"""


def test_6_file_replaced_after_read_is_not_moved_under_the_first_result(tiny_bundle, folders, tmp_path):
    w = folders["watch"]
    first, second = png_bytes(1), png_bytes(2)
    (w / "a.png").write_bytes(first)
    (tmp_path / "b.png").write_bytes(second)
    rc, log = run_once(tiny_bundle, folders, hook=REPLACE_AFTER_READ,
                       env={"SWAP_TARGET": str(w / "a.png"), "SWAP_WITH": str(tmp_path / "b.png")})
    assert rc == 0, log
    recorded = rows(folders["db"])
    for path in folders["processed"].iterdir():        # every moved file is the image its row describes
        (row,) = [r for r in recorded if r["dest_path"] == str(path)]
        assert row["sha256"] == sha(path.read_bytes()), "a file was moved under another image's result"
    by_sha = {r["sha256"]: r for r in recorded}
    assert by_sha[sha(first)]["state"] == "missing"     # read and inspected, then replaced: gone
    assert by_sha[sha(second)]["state"] == "done" and by_sha[sha(second)]["outcome"] == "inspected"
    assert files_in(w) == set()


# --------------------------------------------------------------------------------------------------------------
# 7. a writer that pauses longer than settle_seconds
# --------------------------------------------------------------------------------------------------------------
def test_7_writer_pausing_longer_than_settle_is_not_quarantined(tiny_bundle, folders):
    w = folders["watch"]
    data = png_bytes(5, size=200)
    with Service(tiny_bundle, folders, "--incomplete-seconds", "30") as svc:
        with open(w / "paused.png", "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(2.5)                     # 25 x settle_seconds: the half file is judged complete
            fh.write(data[len(data) // 2:])
        wait_until(lambda: files_in(folders["processed"]) == {"paused.png"}, 120, lambda: svc.log)
        # A truncated file whose writer has closed it is quarantined at once (inotify sees the close).
        if "(inotify)" in svc.log:
            (w / "cut.png").write_bytes(data[: len(data) // 3])
            wait_until(lambda: "cut.png" in files_in(folders["quarantine"]), describe=lambda: svc.log)
    recorded = by_name(folders["db"])
    assert recorded["paused.png"]["outcome"] == "inspected" and recorded["paused.png"]["sha256"] == sha(data)
    assert (folders["processed"] / "paused.png").read_bytes() == data
    assert "paused.png" not in files_in(folders["quarantine"])


# --------------------------------------------------------------------------------------------------------------
# 8. --once drains the folder beyond max_pending
# --------------------------------------------------------------------------------------------------------------
def test_8_once_drains_the_whole_folder_beyond_max_pending(tiny_bundle, folders):
    names = {f"img {i:02d}.png" for i in range(12)}
    for i, name in enumerate(sorted(names)):
        (folders["watch"] / name).write_bytes(png_bytes(i))
    rc, log = run_once(tiny_bundle, folders, "--max-pending", "5")
    assert rc == 0, log
    assert files_in(folders["watch"]) == set() and files_in(folders["processed"]) == names
    assert len(rows(folders["db"])) == 12


# --------------------------------------------------------------------------------------------------------------
# 9. the database or JSONL in the watch folder; --db and --jsonl the same file
# --------------------------------------------------------------------------------------------------------------
def test_9_database_and_jsonl_inside_the_watch_folder_are_never_taken_as_images(tiny_bundle, folders):
    w = folders["watch"]
    db, jsonl = w / "results.sqlite3", w / "results.jsonl"
    for round_ in range(2):                  # and again after a restart
        (w / f"img{round_}.png").write_bytes(png_bytes(round_))
        rc, log = run_once(tiny_bundle, folders, "--db", str(db), "--jsonl", str(jsonl))
        assert rc == 0, log
    assert {r["name"] for r in rows(db)} == {"img0.png", "img1.png"}
    assert not folders["quarantine"].exists() or files_in(folders["quarantine"]) == set()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    assert len(jsonl_rows(jsonl)) == 2


def test_9_db_and_jsonl_on_the_same_file_are_refused(tiny_bundle, folders):
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    rc, log = run_once(tiny_bundle, folders, "--jsonl", str(folders["db"]))
    assert rc == 2, log
    assert "jsonl" in log and "is the result database" in log
    assert files_in(folders["watch"]) == {"a.png"}


# --------------------------------------------------------------------------------------------------------------
# 10. a second instance
# --------------------------------------------------------------------------------------------------------------
def test_10_second_instance_is_refused_naming_the_first_ones_pid(tiny_bundle, folders, tmp_path):
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    with Service(tiny_bundle, folders) as first:
        wait_until(lambda: files_in(folders["processed"]) == {"a.png"}, 120, lambda: first.log)
        (folders["watch"] / "b.png").write_bytes(png_bytes(2))
        rc, log = run_once(tiny_bundle, folders)                         # same folder, same database
        assert rc == 2 and f"pid {first.proc.pid}" in log, log
        rc, log = run_once(tiny_bundle, folders, "--db", str(tmp_path / "other.sqlite3"))     # same folder
        assert rc == 2 and f"pid {first.proc.pid}" in log and "watching" in log, log
        other = tmp_path / "other-in"
        other.mkdir()
        rc, log = run_once(tiny_bundle, {**folders, "watch": other})     # same database
        assert rc == 2 and f"pid {first.proc.pid}" in log and "database" in log, log
        wait_until(lambda: files_in(folders["processed"]) == {"a.png", "b.png"}, 120, lambda: first.log)
    assert first.proc.returncode == 0, first.log
    assert sorted(r["name"] for r in rows(folders["db"])) == ["a.png", "b.png"]


# --------------------------------------------------------------------------------------------------------------
# 11. symlinks planted in the output folders; a planted reason file
# --------------------------------------------------------------------------------------------------------------
def test_11_symlinks_planted_in_the_output_folders_are_never_written_through(tiny_bundle, folders, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folders["quarantine"].mkdir()
    os.symlink(outside / "note-target", folders["quarantine"] / "bad.png.reason.txt")
    (folders["quarantine"] / "fake.png.reason.txt").write_text("fake.png: all good, nothing to see\n")
    (folders["watch"] / "bad.png").write_bytes(b"garbage, not an image")
    (folders["watch"] / "fake.png").write_bytes(b"also not an image")
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    assert list(outside.iterdir()) == [], "wrote through a symlink planted in quarantine/"
    recorded = by_name(folders["db"])
    for name in ("bad.png", "fake.png"):
        note = Path(recorded[name]["dest_path"] + ".reason.txt")
        assert not note.is_symlink() and "not an image" in note.read_text(), note


def test_11_symlink_at_the_cross_filesystem_temporary_is_never_written_through(tiny_bundle, folders, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the tests' temporary folder")
    processed = Path(tempfile.mkdtemp(prefix="processed-", dir=shm))
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        os.symlink(outside / "copy-target", processed / ".a.png.partial")     # the old temporary's name
        (folders["watch"] / "a.png").write_bytes(png_bytes(1))
        rc, log = run_once(tiny_bundle, {**folders, "processed": processed})
        assert rc == 0, log
        assert list(outside.iterdir()) == [], "wrote through a symlink planted in processed/"
        assert (processed / "a.png").read_bytes() == png_bytes(1)
        assert sorted(p.name for p in processed.iterdir()) == [".a.png.partial", "a.png"]   # no temporary left
    finally:
        shutil.rmtree(processed, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# 12. memory: refused by a budget, and converted without full-size copies
# --------------------------------------------------------------------------------------------------------------
def test_12_image_over_the_decode_memory_budget_is_quarantined_with_the_reason(tiny_bundle, folders):
    w = folders["watch"]
    Image.new("RGBA", (2000, 2000), (90, 90, 90, 255)).save(w / "big rgba.png")     # 16 MB decoded: over 12
    Image.new("L", (2000, 2000), 90).save(w / "big gray.png")                      # 4 MB decoded: fits
    rc, log = run_once(tiny_bundle, folders, "--max-decode-mb", "12")
    assert rc == 0, log
    recorded = by_name(folders["db"])
    assert recorded["big gray.png"]["outcome"] == "inspected"
    reason = recorded["big rgba.png"]["reason"]
    assert recorded["big rgba.png"]["outcome"] == "quarantined" and "memory budget" in reason, reason
    assert "2000x2000 RGBA" in reason


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a running process (its own, not inherited from the parent at fork)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_12_large_colour_image_adds_little_more_than_its_decoded_size(tiny_bundle, folders):
    """A 3000x3000 RGBA PNG decodes to 34 MB; converting it to gray used to cost four more full-size copies
    (~180 MB). The peak must now stay within the decoded image plus one byte per pixel and some slack."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    rgba = np.zeros((3000, 3000, 4), np.uint8)
    rgba[..., :3] = np.arange(3000, dtype=np.uint8)[None, :, None]
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(folders["log"].with_name("big.png"))
    del rgba
    with Service(tiny_bundle, folders) as svc:
        time.sleep(0.5)
        idle = vm_hwm_mb(svc.proc.pid)
        os.rename(folders["log"].with_name("big.png"), folders["watch"] / "big.png")
        wait_until(lambda: files_in(folders["processed"]) == {"big.png"}, 240, lambda: svc.log)
        growth = vm_hwm_mb(svc.proc.pid) - idle
    print(f"peak RSS growth for a 3000x3000 RGBA PNG: {growth:.0f} MB")
    assert growth < 34 + 9 + 25, f"peak RSS grew by {growth:.0f} MB for a 3000x3000 RGBA image"


# --------------------------------------------------------------------------------------------------------------
# also: NaN settings, newlines in names, unreadable files
# --------------------------------------------------------------------------------------------------------------
def test_settle_seconds_nan_is_refused(tiny_bundle, folders):
    rc, log = run_once(tiny_bundle, folders, "--settle-seconds", "nan")
    assert rc == 2 and "settle_seconds" in log and "finite" in log, log


def test_newline_in_a_name_cannot_split_a_log_line(tiny_bundle, folders):
    (folders["watch"] / "a\nforged line.png").write_bytes(png_bytes(1))
    (folders["watch"] / "b\nforged line.png").write_bytes(b"not an image")
    rc, log = run_once(tiny_bundle, folders)
    assert rc == 0, log
    for line in log.splitlines():
        assert line.startswith(("20", "INFO: Created TensorFlow")), f"a log line was split: {line!r}"
    assert "'a\\nforged line.png'" in log
    assert {r["name"] for r in rows(folders["db"])} == {"a\nforged line.png", "b\nforged line.png"}


def run_without_root(argv: list[str]) -> tuple[int, str]:
    """edge-inspect ARGV where file permissions apply: as an unprivileged user when the tests run as root."""
    if os.geteuid() == 0:
        return run_unprivileged(argv)
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=120)
    return proc.returncode, proc.stderr


def test_unreadable_file_stays_and_is_retried_not_quarantined(tiny_bundle, tmp_path):
    """A file the service may not read (permissions) is left where it is and taken once it becomes readable.
    As root (CI) the service runs as an unprivileged user: root reads every file whatever its mode."""
    if not hasattr(os, "setuid"):
        pytest.skip("needs setuid to drop privileges")
    shared = Path(tempfile.mkdtemp(prefix="unreadable-watch-"))
    try:
        bundle = shared / "bundle"
        shutil.copytree(tiny_bundle, bundle)
        for path in [shared, bundle, *bundle.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        watch = shared / "in"
        watch.mkdir()
        watch.chmod(0o777)
        (watch / "ok.png").write_bytes(png_bytes(1))
        locked = watch / "locked.png"
        locked.write_bytes(png_bytes(2))
        locked.chmod(0)
        (shared / "state").mkdir()
        (shared / "state").chmod(0o777)
        argv = ["--models", str(bundle), "--watch", str(watch), "--db", str(shared / "state" / "r.sqlite3"),
                "--processed", str(shared / "state" / "done"), "--quarantine", str(shared / "state" / "bad"),
                "--settle-seconds", "0", "--summary-seconds", "0", "--threads", "1", "--once"]
        code, err = run_without_root(argv)
        assert code == 0, err
        assert files_in(watch) == {"locked.png"}, "an unreadable file must stay in the folder, to be retried"
        assert not (shared / "state" / "bad").exists() or files_in(shared / "state" / "bad") == set()
        assert "locked.png: cannot read it" in err and "Permission denied" in err
        locked.chmod(0o644)
        code, err = run_without_root(argv)
        assert code == 0, err
        assert files_in(shared / "state" / "done") == {"ok.png", "locked.png"}
    finally:
        shutil.rmtree(shared, ignore_errors=True)
