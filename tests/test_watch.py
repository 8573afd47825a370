"""`edge-inspect --watch`: the drop-folder service (in-process and as real subprocesses)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from edge_runtime.config import service_config
from edge_runtime.service import fileops
from edge_runtime.cli import main
from edge_runtime.exits import WatchError
from edge_runtime.inspector import Inspector
from edge_runtime.db.journal import Journal
from edge_runtime.config.service_config import ConfigError, load_service_config
from edge_runtime.db.store import StorageError, is_disk_full
from edge_runtime.inputs import is_ignored_name
from edge_runtime.service.watch import WatchService
from tests.support.images import png_bytes
from tests.support.paths import REPO
from tests.support.waiting import wait_until
from tests.support.watch import files_in, jsonl_rows, make_config, rows, run_in_thread, start_service


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inspector(tiny_bundle):
    return Inspector(tiny_bundle, threads=1)


def assert_consistent(folders, expected_names) -> list[dict]:
    """Exactly one row per dropped file, everything moved, JSONL == DB."""
    recorded = rows(folders["db"])
    assert sorted(r["name"] for r in recorded) == sorted(expected_names)
    assert len({r["key"] for r in recorded}) == len(recorded)
    assert all(r["state"] == "done" and r["journaled"] == 1 for r in recorded), recorded
    for r in recorded:
        assert Path(r["dest_path"]).is_file(), r
    waiting = {n for n in files_in(folders["watch"]) if not is_ignored_name(n)}
    assert waiting == set()
    journal = jsonl_rows(folders["jsonl"])
    assert sorted(j["id"] for j in journal) == [r["id"] for r in recorded]
    return recorded


class Spy:
    """Wraps Inspector.inspect to see what the service fed it."""

    def __init__(self, inspector):
        self.inspector = inspector
        self.calls: list[tuple[str, int]] = []
        self.bundle = inspector.bundle

    def inspect(self, data, path=None):
        self.calls.append((Path(path).name, len(data)))
        return self.inspector.inspect(data, path=path)

    def describe(self):
        return self.inspector.describe()


# ---------------------------------------------------------------------------------------------------------
# in-process service
# ---------------------------------------------------------------------------------------------------------
def test_backlog_recorded_moved_quarantined_and_journaled(tiny_bundle, inspector, folders):
    w = folders["watch"]
    good = {"plain.png": png_bytes(1), "with space.png": png_bytes(2), "ünïcødé 日本.jpg": png_bytes(3, fmt="JPEG"),
            "scan.tif": png_bytes(4, fmt="TIFF")}
    for name, data in good.items():
        (w / name).write_bytes(data)
    full = png_bytes(5)
    bad = {"truncated.png": full[: len(full) // 2], "garbage.png": b"definitely not an image",
           "empty.png": b"", "notes.txt": b"hello"}
    for name, data in bad.items():
        (w / name).write_bytes(data)
    ignored = [".hidden.png", "copying.png.part", "x.tmp", "~lock.png", "dl.png.crdownload"]
    for name in ignored:
        (w / name).write_bytes(png_bytes(6))
    (w / "a folder").mkdir()

    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0

    recorded = assert_consistent(folders, set(good) | set(bad))
    by_name = {r["name"]: r for r in recorded}
    assert files_in(folders["processed"]) == set(good)
    for name in good:
        r = by_name[name]
        assert r["outcome"] == "inspected" and r["label"] in ("clean", "bridges", "cracks", "opens")
        assert r["sha256"] == hashlib.sha256(good[name]).hexdigest()
        assert (folders["processed"] / name).read_bytes() == good[name]
    assert files_in(folders["quarantine"]) == set(bad) | {f"{n}.reason.txt" for n in bad}
    assert "truncated" in by_name["truncated.png"]["reason"]
    assert "not an image" in by_name["garbage.png"]["reason"]
    assert "empty" in by_name["empty.png"]["reason"]
    assert "unsupported file type '.txt'" in by_name["notes.txt"]["reason"]
    note = (folders["quarantine"] / "truncated.png.reason.txt").read_text()
    assert "truncated" in note
    assert set(ignored) <= files_in(w)          # hidden/temp names are never touched
    journal = {j["name"]: j for j in jsonl_rows(folders["jsonl"])}
    for key in ("path", "label", "stage1_score", "defect_class", "confidence", "review", "latency_ms"):
        assert key in journal["plain.png"]
    assert journal["with space.png"]["moved_to"] == str(folders["processed"] / "with space.png")


def test_restart_and_redrop_never_duplicate(tiny_bundle, inspector, folders):
    w = folders["watch"]
    (w / "a.png").write_bytes(png_bytes(1))
    cfg = make_config(tiny_bundle, folders)
    assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    assert len(rows(folders["db"])) == 1
    # The very same file dropped again is recognised (same content, same name): not recorded twice.
    (w / "a.png").write_bytes(png_bytes(1))
    assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    assert len(rows(folders["db"])) == 1 and "a.png" not in files_in(w)
    # Same name, new content: a new image, kept beside the first under a distinct name.
    (w / "a.png").write_bytes(png_bytes(2))
    assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    recorded = assert_consistent(folders, ["a.png", "a.png"])
    assert len(files_in(folders["processed"])) == 2
    assert Path(recorded[1]["dest_path"]).read_bytes() == png_bytes(2)


def test_oversized_file_is_quarantined(tiny_bundle, inspector, folders):
    (folders["watch"] / "big.png").write_bytes(png_bytes(1, size=200))
    (folders["watch"] / "small.png").write_bytes(png_bytes(2, size=8))
    cfg = make_config(tiny_bundle, folders, max_file_bytes=5000)
    assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    by_name = {r["name"]: r for r in assert_consistent(folders, {"big.png", "small.png"})}
    assert by_name["big.png"]["outcome"] == "quarantined" and "too large" in by_name["big.png"]["reason"]
    assert by_name["small.png"]["outcome"] == "inspected"


def test_leave_in_place_records_once(tiny_bundle, inspector, folders):
    w = folders["watch"]
    (w / "a.png").write_bytes(png_bytes(1))
    (w / "bad.png").write_bytes(b"xx")
    cfg = make_config(tiny_bundle, folders, processed=None, leave_in_place=True)
    for _ in range(2):
        assert WatchService(cfg, inspector=inspector).run(once=True) == 0
    recorded = rows(folders["db"])
    assert [r["name"] for r in recorded] == ["a.png", "bad.png"]
    assert recorded[0]["dest_path"] == str(w / "a.png") and (w / "a.png").exists()
    assert (folders["quarantine"] / "bad.png").exists()     # unusable files still leave the drop folder
    assert not folders["processed"].exists()


@pytest.mark.parametrize("inotify", ["auto", "off"])
def test_slow_writer_is_not_read_until_complete(tiny_bundle, inspector, folders, inotify):
    spy = Spy(inspector)
    service = WatchService(make_config(tiny_bundle, folders, settle_seconds=0.8, inotify=inotify), inspector=spy)
    assert (service.notifier is not None) == (inotify == "auto")
    thread, out = run_in_thread(service)
    try:
        data = png_bytes(7, size=120)
        with open(folders["watch"] / "slow scan é.png", "wb") as fh:
            for i in range(0, len(data), len(data) // 6 + 1):
                fh.write(data[i:i + len(data) // 6 + 1])
                fh.flush()
                time.sleep(0.15)        # gaps well under settle_seconds
        wait_until(lambda: files_in(folders["processed"]))
    finally:
        service.stop()
        thread.join(10)
    assert out["rc"] == 0
    assert spy.calls == [("slow scan é.png", len(data))], "read before the writer had finished"
    (row,) = rows(folders["db"])
    assert row["outcome"] == "inspected" and row["size"] == len(data)


def test_write_then_rename_and_temp_names(tiny_bundle, inspector, folders):
    spy = Spy(inspector)
    # A long settle time: renamed-in files must not wait for it (the rename says they are complete).
    service = WatchService(make_config(tiny_bundle, folders, settle_seconds=30), inspector=spy)
    if service.notifier is None:
        pytest.skip("inotify unavailable: rename events cannot be seen")
    thread, out = run_in_thread(service)
    w = folders["watch"]
    try:
        time.sleep(0.2)
        for name, tmp in (("a.png", "a.png.part"), ("b c.png", ".b c.png.tmp"), ("d.png", "d.png.crdownload")):
            data = png_bytes(len(name))
            with open(w / tmp, "wb") as fh:
                fh.write(data[:50])
                fh.flush()
                time.sleep(0.2)
                fh.write(data[50:])
            os.rename(w / tmp, w / name)
        wait_until(lambda: len(files_in(folders["processed"])) == 3, describe=lambda: files_in(folders["processed"]))
    finally:
        service.stop()
        thread.join(10)
    assert out["rc"] == 0
    assert sorted(n for n, _ in spy.calls) == ["a.png", "b c.png", "d.png"]
    assert files_in(w) == set()


def test_crash_between_record_and_move_is_recovered(tiny_bundle, inspector, folders, monkeypatch):
    class Crash(BaseException):
        pass

    names = [f"img{i}.png" for i in range(4)]
    for i, name in enumerate(names):
        (folders["watch"] / name).write_bytes(png_bytes(i))
    real_move = fileops.move
    calls = {"n": 0}

    def crashing_move(src, dest, expect=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash()           # the process dies after the commit and the JSONL line, before the move
        real_move(src, dest, expect)
    monkeypatch.setattr(fileops, "move", crashing_move)
    with pytest.raises(Crash):
        WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True)
    recorded_before = {r["name"] for r in rows(folders["db"])}
    assert len(files_in(folders["processed"])) == 1 and len(recorded_before) >= 2
    assert all(r["state"] == "recorded" for r in rows(folders["db"])[1:])
    monkeypatch.setattr(fileops, "move", real_move)
    spy = Spy(inspector)
    assert WatchService(make_config(tiny_bundle, folders), inspector=spy).run(once=True) == 0
    assert_consistent(folders, set(names))
    assert sorted(n for n, _ in spy.calls) == sorted(set(names) - recorded_before), \
        "an image recorded before the crash was inspected again"


def test_crash_in_the_middle_of_a_jsonl_line_is_repaired(tiny_bundle, inspector, folders, monkeypatch):
    class Crash(BaseException):
        pass

    for i in range(3):
        (folders["watch"] / f"img{i}.png").write_bytes(png_bytes(i))
    real_append = Journal.append
    calls = {"n": 0}

    def half_append(self, obj):
        calls["n"] += 1
        if calls["n"] == 2:
            self.fh.write(json.dumps(obj).encode()[:25])
            self.fh.flush()
            raise Crash()
        real_append(self, obj)
    monkeypatch.setattr(Journal, "append", half_append)
    with pytest.raises(Crash):
        WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True)
    monkeypatch.setattr(Journal, "append", real_append)
    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0
    assert_consistent(folders, {"img0.png", "img1.png", "img2.png"})


def test_disk_full_on_move_stops_and_keeps_the_image(tiny_bundle, inspector, folders, monkeypatch, caplog):
    for i in range(3):
        (folders["watch"] / f"img{i}.png").write_bytes(png_bytes(i))

    def full(src, dest, expect=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    real_move = fileops.move
    monkeypatch.setattr(fileops, "move", full)
    caplog.set_level("ERROR", logger="edge_inspect")
    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 3
    assert "disk full" in caplog.text and "No space left" in caplog.text
    assert files_in(folders["watch"]) >= {"img0.png", "img1.png", "img2.png"}   # nothing lost
    assert files_in(folders["processed"]) == set()   # stopped taking work at the first failure
    monkeypatch.setattr(fileops, "move", real_move)
    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0
    assert_consistent(folders, {"img0.png", "img1.png", "img2.png"})


def test_disk_full_on_database_write_stops_and_keeps_the_image(tiny_bundle, inspector, folders, caplog):
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    service = WatchService(make_config(tiny_bundle, folders), inspector=inspector)

    class FullDisk:
        """The sqlite3 connection as it behaves on a full disk: reads work, the INSERT fails."""

        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)
    service.store.db = FullDisk(service.store.db)
    caplog.set_level("ERROR", logger="edge_inspect")
    assert service.run(once=True) == 3
    assert "disk full" in caplog.text and "database or disk is full" in caplog.text
    assert files_in(folders["watch"]) >= {"a.png"} and rows(folders["db"]) == []
    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0
    assert_consistent(folders, {"a.png"})


def test_images_of_an_open_group_are_not_taken_again_before_its_commit(tiny_bundle, inspector, folders):
    """While a group's transaction is open (another file is still being written) its images stay in the folder
    and rescans keep seeing them; the loop must leave them alone (Recorder.holds), or they would be found by
    key and moved before their result is committed."""
    w = folders["watch"]
    for name in ("a.png", "b.png"):
        (w / name).write_bytes(png_bytes(len(name) + ord(name[0])))
    slow = png_bytes(9, size=120)
    (w / "slow.png").write_bytes(slow[:100])
    spy = Spy(inspector)
    service = WatchService(make_config(tiny_bundle, folders, settle_seconds=0.2, rescan_seconds=0.05,
                                       poll_seconds=0.05, commit_seconds=30, commit_every=100), inspector=spy)
    at_commit = []
    real_commit = service.store.commit

    def commit(*args, **kwargs):
        at_commit.append(files_in(folders["processed"]))
        return real_commit(*args, **kwargs)
    service.store.commit = commit
    thread, out = run_in_thread(service)
    try:
        step = len(slow) // 12 + 1
        for i in range(100, len(slow), step):     # ~1.2 s of a slow writer: a.png and b.png wait in the group
            time.sleep(0.1)
            with open(w / "slow.png", "ab") as fh:
                fh.write(slow[i:i + step])
        wait_until(lambda: len(files_in(folders["processed"])) == 3, describe=lambda: files_in(folders["processed"]))
    finally:
        service.stop()
        thread.join(10)
    assert out["rc"] == 0
    assert at_commit and at_commit[0] == set(), f"moved before their commit: {at_commit[0]}"
    assert sorted(n for n, _ in spy.calls) == ["a.png", "b.png", "slow.png"]
    assert service.stats.total.recovered == 0
    assert_consistent(folders, {"a.png", "b.png", "slow.png"})


def test_unexpected_inspection_error_quarantines_only_that_file(tiny_bundle, inspector, folders):
    for name in ("a.png", "boom.png", "c.png"):
        (folders["watch"] / name).write_bytes(png_bytes(len(name) + ord(name[0])))

    class Flaky(Spy):
        def inspect(self, data, path=None):
            if Path(path).name == "boom.png":
                raise RuntimeError("interpreter hiccup")
            return super().inspect(data, path)
    assert WatchService(make_config(tiny_bundle, folders), inspector=Flaky(inspector)).run(once=True) == 0
    by_name = {r["name"]: r for r in assert_consistent(folders, {"a.png", "boom.png", "c.png"})}
    assert by_name["boom.png"]["outcome"] == "quarantined"
    assert "RuntimeError: interpreter hiccup" in by_name["boom.png"]["reason"]
    assert by_name["a.png"]["outcome"] == by_name["c.png"]["outcome"] == "inspected"


def test_one_line_per_image_and_a_periodic_summary(tiny_bundle, inspector, folders, caplog):
    caplog.set_level("INFO", logger="edge_inspect")
    for i in range(3):
        (folders["watch"] / f"s{i}.png").write_bytes(png_bytes(i))
    (folders["watch"] / "bad.png").write_bytes(b"nope")
    service = WatchService(make_config(tiny_bundle, folders, summary_seconds=0.3), inspector=inspector)
    thread, out = run_in_thread(service)
    try:
        wait_until(lambda: "summary" in caplog.text, describe=lambda: caplog.text)
        time.sleep(1.0)             # idle: no summary lines while nothing happens
    finally:
        service.stop()
        thread.join(10)
    assert out["rc"] == 0
    per_image = [r for r in caplog.records if r.getMessage().startswith(("s0.png", "s1.png", "s2.png", "bad.png"))]
    assert len(per_image) == 4
    assert [r.levelname for r in per_image if r.getMessage().startswith("bad.png")] == ["WARNING"]
    summaries = [r.getMessage() for r in caplog.records if "summary" in r.getMessage()]
    assert 1 <= len(summaries) <= 2, summaries
    counts = [re.search(r"(\d+) inspected .*?, (\d+) quarantined", m).groups() for m in summaries]
    assert [sum(int(c[0]) for c in counts), sum(int(c[1]) for c in counts)] == [3, 1]


def test_move_across_file_systems_copies_then_removes(tmp_path, monkeypatch):
    src, dest = tmp_path / "a b.png", tmp_path / "out" / "a b.png"
    dest.parent.mkdir()
    src.write_bytes(png_bytes(3))
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    real_rename = os.rename

    def rename(a, b):
        if Path(a).parent != Path(b).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b)
    monkeypatch.setattr(fileops.os, "rename", rename)
    fileops.move(src, dest)
    assert not src.exists() and dest.read_bytes() == png_bytes(3)
    assert dest.stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["a b.png"]     # no temporary left behind


def test_database_schema_is_the_documented_one(tiny_bundle, inspector, folders):
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    assert WatchService(make_config(tiny_bundle, folders), inspector=inspector).run(once=True) == 0
    con = sqlite3.connect(folders["db"])
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == 4
        columns = [r[1] for r in con.execute("PRAGMA table_info(results)")]
    finally:
        con.close()
    from edge_runtime.db import store
    assert tuple(columns) == store.COLUMNS
    for column in columns:              # every column is described in the module docstring
        assert f"\n        {column} " in store.__doc__, column


def test_watch_folder_removed_while_running_is_a_clear_error(tiny_bundle, inspector, folders, caplog):
    caplog.set_level("ERROR", logger="edge_inspect")
    service = WatchService(make_config(tiny_bundle, folders, rescan_seconds=0.2), inspector=inspector)
    thread, out = run_in_thread(service)
    time.sleep(0.3)
    folders["watch"].rmdir()
    thread.join(15)
    assert out.get("rc") == 2
    assert "watch folder" in caplog.text and ("deleted" in caplog.text or "no longer exists" in caplog.text)


def test_storage_error_type_reports_disk_full():
    err = StorageError("x", disk_full=True)
    assert err.disk_full and is_disk_full(OSError(errno.ENOSPC, "full"))


def test_memory_stays_flat_over_a_long_run(tiny_bundle, inspector, folders):
    service = WatchService(make_config(tiny_bundle, folders, settle_seconds=0.05, jsonl=None), inspector=inspector)
    thread, out = run_in_thread(service)
    payloads = [png_bytes(i) for i in range(40)]
    sizes = []
    try:
        tracemalloc.start()
        for batch in range(4):
            for i, data in enumerate(payloads):
                (folders["watch"] / f"b{batch}-{i}.png").write_bytes(data)
            wait_until(lambda: len(files_in(folders["processed"])) == 40 * (batch + 1),
                       120, lambda: files_in(folders["processed"]))
            time.sleep(0.1)
            sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        service.stop()
        thread.join(10)
    assert out["rc"] == 0 and len(rows(folders["db"])) == 160
    growth = sizes[-1] - sizes[1]
    assert growth < 100 * 1024, f"Python heap grew by {growth} bytes over 80 images: {sizes}"
    assert service.pending == {} and service.recorder.pending_marks == 0


# ---------------------------------------------------------------------------------------------------------
# configuration and setup errors
# ---------------------------------------------------------------------------------------------------------
def test_service_config_file_validation_and_overrides(tiny_bundle, folders, tmp_path):
    cfg_file = tmp_path / "service.yaml"
    cfg_file.write_text(f"models: {tiny_bundle}\nwatch: incoming\nprocessed: done\nsettle_seconds: 2\n"
                        "durability: normal\n")
    cfg = load_service_config(cfg_file)
    assert cfg.watch == str(tmp_path / "incoming") and cfg.processed == str(tmp_path / "done")
    assert cfg.settle_seconds == 2.0 and cfg.durability == "normal"
    assert cfg.quarantine == str(tmp_path / "incoming" / "quarantine")
    assert cfg.db == str(tmp_path / "incoming" / ".edge-inspect.sqlite3")
    cfg = load_service_config(cfg_file, {"settle_seconds": 0.5, "processed": None, "leave_in_place": True})
    assert cfg.settle_seconds == 0.5 and cfg.leave_in_place and cfg.processed is None
    for bad, message in (("colour: red\n", "unknown key 'colour'"), ("settle_seconds: soon\n", "settle_seconds"),
                         ("inotify: maybe\n", "inotify"), ("threads: 0\n", "threads"),
                         ("processed: incoming\n", "different folder")):
        cfg_file.write_text(f"models: {tiny_bundle}\nwatch: incoming\n{bad}")
        with pytest.raises(ConfigError, match=message):
            load_service_config(cfg_file)
    with pytest.raises(ConfigError, match="not found"):
        load_service_config(tmp_path / "none.yaml")


def test_example_service_config_is_generated_valid_and_complete():
    import yaml
    example = REPO / "edge_runtime" / "config" / "service.example.yaml"
    text = example.read_text()
    assert text == service_config.example_yaml(), \
        "regenerate it: python -m edge_runtime.config.service_config > edge_runtime/config/service.example.yaml"
    cfg = load_service_config(example)
    assert cfg.watch == "/srv/sem/incoming" and cfg.processed == "/srv/sem/processed"
    commented = {m[1] for line in text.splitlines() if (m := re.match(r"# ([a-z_]+): ", line))
                 and m[1] in service_config.SETTINGS}
    assert commented == {"leave_in_place", "trusted_keys", "board_key", "shadow", "bundles_dir", "variant", "threads",
                         "runtime",
                         "board", "mqtt", "mqtt_username",
                         "mqtt_password", "mqtt_tls", "mqtt_ca", "http", "http_token", "http_allowed_hosts"}
    assert set(yaml.safe_load(text)) | commented == set(service_config.SETTINGS), "every setting appears"
    assert "# leave_in_place: true" in text


def _another_value(name: str, tmp_path: Path):
    """A valid value of a setting that differs from its default."""
    f = service_config.SETTINGS[name]
    meta, kind = f.metadata, service_config.kind_of(name)
    if meta["path"]:
        return str(tmp_path / name)
    if meta["choices"]:
        return next(c for c in reversed(meta["choices"]) if c != f.default)
    if kind is bool:
        return not f.default
    if kind is str:     # the example value where it is one (e.g. HOST:PORT), else any text
        return meta["example"] if isinstance(meta["example"], str) and meta["example"] != f.default else "float32"
    if meta["maximum"] is not None and (f.default or 0.0) + 0.25 > meta["maximum"]:
        return f.default - 0.25
    return kind((f.default or 1) + 1) if kind is int else (f.default or 0.0) + 0.25


def test_every_setting_is_a_flag_that_reaches_the_config(tmp_path):
    """The flags are derived from the settings: each one, given on the command line, ends up in the config."""
    from edge_runtime.cli import build_parser

    expected = {name: _another_value(name, tmp_path) for name in service_config.SETTINGS}
    for exclusive, dropped in (("processed", "leave_in_place"), ("leave_in_place", "processed")):
        argv = []
        for name, value in expected.items():
            if name == dropped:
                continue
            flag = service_config.flag_name(name)
            argv += [flag] if value is True else [flag, str(value)]
        args = build_parser().parse_args(argv)
        cfg = load_service_config(None, service_config.flag_values(args))
        for name, value in expected.items():
            if name != dropped:
                assert getattr(cfg, name) == value, name
        assert bool(cfg.leave_in_place) == (exclusive == "leave_in_place")


def test_every_setting_is_checked_in_files_and_flags(tiny_bundle, tmp_path):
    """Types, choices and bounds come from the setting's definition, for a config file and for flags alike."""
    cfg_file = tmp_path / "service.yaml"
    for name, f in service_config.SETTINGS.items():
        meta, kind = f.metadata, service_config.kind_of(name)
        bad = [[1, 2]] if kind is not bool else ["yes"]
        if meta["choices"]:
            bad.append("bogus")
        if meta["positive"]:
            bad.append(kind(0))
        if meta["minimum"] is not None:
            bad.append(kind(meta["minimum"] - 1))
        if meta["maximum"] is not None:
            bad.append(kind(meta["maximum"] + 1))
        for value in bad:
            cfg_file.write_text(yaml.safe_dump({"models": str(tiny_bundle), "watch": "incoming", name: value}))
            with pytest.raises(ConfigError, match=name):
                load_service_config(cfg_file)
            with pytest.raises(ConfigError, match=name):
                load_service_config(None, {"models": str(tiny_bundle), "watch": str(tmp_path), name: value})


def test_cli_watch_once_with_config_file(tiny_bundle, folders, tmp_path):
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    cfg_file = tmp_path / "service.yaml"
    cfg_file.write_text(f"models: {tiny_bundle}\nwatch: {folders['watch']}\nprocessed: {folders['processed']}\n"
                        f"quarantine: {folders['quarantine']}\ndb: {folders['db']}\nsettle_seconds: 0.1\n"
                        f"summary_seconds: 0\nthreads: 1\n")
    assert main(["--config", str(cfg_file), "--once", "--jsonl", str(folders["jsonl"])]) == 0
    assert_consistent(folders, {"a.png"})
    cfg_file.write_text("models: x\nwatch: y\nbogus: 1\n")
    assert main(["--config", str(cfg_file)]) == 2


def test_setup_errors_are_clear(tiny_bundle, folders, tmp_path, capsys, monkeypatch):
    args = ["--models", str(tiny_bundle), "--once", "--watch"]
    assert main(args + [str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(args + [str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["--models", str(tmp_path / "nobundle"), "--once", "--watch", str(folders["watch"])]) == 2
    assert "bundle folder does not exist" in capsys.readouterr().err
    assert main(args + [str(folders["watch"]), "--processed", str(folders["watch"])]) == 2
    assert "different folder" in capsys.readouterr().err
    monkeypatch.setattr(fileops.os, "access", lambda path, mode: False)
    assert main(args + [str(folders["watch"])]) == 2
    assert "no permission" in capsys.readouterr().err
    with pytest.raises(WatchError, match="no permission"):
        WatchService(make_config(tiny_bundle, folders))


# ---------------------------------------------------------------------------------------------------------
# real processes: SIGTERM and kill -9
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_finishes_and_exits_zero(tiny_bundle, folders, tmp_path, sig):
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log)
    try:
        wait_until(lambda: "watching" in log.read_text(errors="replace"), 240, lambda: log.read_text())
        for i in range(5):
            (folders["watch"] / f"img {i}.png").write_bytes(png_bytes(i))
        wait_until(lambda: len(files_in(folders["processed"])) >= 2, 120, lambda: files_in(folders["processed"]))
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert f"{sig.name} received" in text and "stopped:" in text
    recorded = rows(folders["db"])
    assert all(r["state"] == "done" for r in recorded)      # flushed: nothing left half-done
    assert len(recorded) == len(files_in(folders["processed"]))


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        return len(rows(db))
    except sqlite3.Error:          # created but the schema is not there yet
        return 0


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tiny_bundle, folders, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    log = tmp_path / "service.log"
    dropped: list[str] = []
    n_rounds, per_round = 6, 12
    for rnd in range(n_rounds):
        proc = start_service(tiny_bundle, folders, log)
        try:
            before = count_rows(folders["db"])
            for i in range(per_round):
                name = f"r{rnd} img {i} é.png"
                data = png_bytes(rnd * 100 + i, size=rng.choice([64, 300, 600]))
                if i == 3:
                    data = data[: len(data) // 3]           # a truncated file: quarantined exactly once
                if i % 2:
                    (folders["watch"] / (name + ".part")).write_bytes(data)
                    os.rename(folders["watch"] / (name + ".part"), folders["watch"] / name)
                else:
                    (folders["watch"] / name).write_bytes(data)
                dropped.append(name)
            # Kill it at a random point of the stream: after a random number of results, plus a random
            # fraction of one image's processing time.
            target = before + rng.randint(0, per_round - 1)
            wait_until(lambda: count_rows(folders["db"]) >= target, 240, lambda: count_rows(folders["db"]), step=0.002)
            time.sleep(rng.uniform(0.0, 0.008))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    final = start_service(tiny_bundle, folders, log, "--once")
    assert final.wait(timeout=120) == 0, log.read_text(errors="replace")[-4000:]
    recorded = assert_consistent(folders, dropped)
    assert sum(r["outcome"] == "quarantined" for r in recorded) == n_rounds, f"seed {seed}"
    assert len(files_in(folders["processed"])) == len(dropped) - n_rounds
    text = log.read_text(errors="replace")
    print(f"seed {seed}: {text.count('already recorded')} interrupted move(s) finished, "
          f"{text.count('brought up to date')} journal catch-up(s), {text.count('recovery:')} recoveries")
