"""`edge-inspect --models BUNDLE PATH...`: JSON lines, table, exit codes, awkward names."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.cli import main
from tests.support.bundles import TINY_STAGE2
from tests.support.paths import REPO
from tests.support.unprivileged import run_unprivileged

FIELDS = ("path", "label", "stage1_score", "defect_class", "confidence", "review", "latency_ms")


def make_images(folder: Path, names, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_output_fields_and_awkward_names(tiny_bundle, tmp_path, capsys):
    names = ["plain.png", "with space.png", "ünïcødé 日本.jpg", "sub dir/nested.tif"]
    paths = make_images(tmp_path / "imgs", names)
    code = main(["--models", str(tiny_bundle), "--json", "--threads", "1", str(tmp_path / "imgs")])
    out = capsys.readouterr().out
    assert code == 0
    rows = json_lines(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)
    for r in rows:
        assert all(k in r for k in FIELDS)
        assert isinstance(r["review"], bool) and r["latency_ms"] > 0
        if r["defect_class"] is None:
            assert r["label"] == "clean" and r["review"] is False
        else:
            assert r["label"] == r["defect_class"] and r["defect_class"] in TINY_STAGE2
    # Non-ASCII stays readable (not \u-escaped) in the JSON text.
    assert "ünïcødé 日本.jpg" in out


def test_bad_file_among_good_ones_exits_nonzero_after_all_others(tiny_bundle, tmp_path, capsys):
    good = make_images(tmp_path, ["a.png", "c.png"])
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "gone.png"
    code = main(["--models", str(tiny_bundle), "--json", str(good[0]), str(bad), str(missing), str(good[1])])
    captured = capsys.readouterr()
    assert code == 1
    rows = json_lines(captured.out)
    ok = [r for r in rows if "error" not in r]
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert [r["path"] for r in ok] == [str(good[0]), str(good[1])]
    assert set(errors) == {str(bad), str(missing)}
    assert "not an image" in errors[str(bad)] and "no such file" in errors[str(missing)]
    assert "b.png" in captured.err and "2 failed" in captured.err


def test_table_output(tiny_bundle, tmp_path, capsys):
    make_images(tmp_path, ["x.png", "y.bmp"])
    (tmp_path / "notes.txt").write_text("not an image, skipped when a folder is walked")
    code = main(["--models", str(tiny_bundle), str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split()[:3] == ["label", "P(defect)", "conf"]
    assert len(out) == 3 and out[1].endswith("x.png") and out[2].endswith("y.bmp")
    assert out[1].split()[0] in ("clean", *TINY_STAGE2)


def test_setup_errors_exit_2_with_a_clear_message(tiny_bundle, tmp_path, capsys):
    img = make_images(tmp_path, ["a.png"])[0]
    assert main(["--models", str(tmp_path / "nope"), str(img)]) == 2
    assert "bundle folder does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "stage1.tflite", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    assert main(["--models", str(broken), str(img)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert main(["--models", str(tiny_bundle), "--variant", "float16", str(img)]) == 2
    assert "no variant 'float16'" in capsys.readouterr().err
    assert main(["--models", str(tiny_bundle)]) == 2
    assert main([str(img)]) == 2
    assert "--models" in capsys.readouterr().err


@pytest.fixture
def built_inspectors(monkeypatch) -> list:
    """Every Inspector the CLI builds (one-off or service), recorded as built."""
    import edge_runtime.inspector as inspector_mod

    built = []

    class Recording(inspector_mod.Inspector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)
    monkeypatch.setattr(inspector_mod, "Inspector", Recording)
    return built


def test_variant_threads_and_runtime_reach_the_inspector(tiny_bundle, tmp_path, capsys, built_inspectors):
    img = make_images(tmp_path, ["a.png"])[0]
    threads = (os.cpu_count() or 1) + 1          # not the default (all cores)
    assert main(["--models", str(tiny_bundle), "--json", str(img)]) == 0
    capsys.readouterr()
    default = built_inspectors.pop()
    assert (default.bundle.variant, default.runtime, default.threads) == ("int8", None, os.cpu_count() or 1)
    assert main(["--models", str(tiny_bundle), "--variant", "float32", "--runtime", "litert",
                 "--threads", str(threads), "--json", str(img)]) == 0
    (row,) = json_lines(capsys.readouterr().out)
    assert row["path"] == str(img)
    (insp,) = built_inspectors
    assert (insp.bundle.variant, insp.runtime, insp.threads) == ("float32", "litert", threads)
    assert type(insp.stage1.interpreter).__module__.startswith("ai_edge_litert")
    assert insp.bundle.stage1.input.dtype == "float32"       # the float32 model, not the default int8 one
    assert main(["--models", str(tiny_bundle), "--threads", "0", str(img)]) == 2
    assert "threads must be an integer > 0, got 0" in capsys.readouterr().err


def test_variant_threads_and_runtime_reach_the_service_inspector(tiny_bundle, tmp_path, built_inspectors):
    import sqlite3

    incoming = tmp_path / "in"
    make_images(incoming, ["a.png"])
    db = tmp_path / "r.sqlite3"
    config = tmp_path / "service.yaml"
    config.write_text(f"models: {tiny_bundle}\nwatch: {incoming}\ndb: {db}\nvariant: int8\nthreads: 1\n"
                      "settle_seconds: 0\nsummary_seconds: 0\n")
    threads = (os.cpu_count() or 1) + 1
    assert main(["--config", str(config), "--once", "--variant", "float32", "--runtime", "litert",
                 "--threads", str(threads)]) == 0          # flags override the file
    (insp,) = built_inspectors
    assert (insp.bundle.variant, insp.runtime, insp.threads) == ("float32", "litert", threads)
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT name, variant FROM results").fetchall() == [("a.png", "float32")]
    finally:
        con.close()


def test_console_entry_point_runs_as_a_module(tiny_bundle, tmp_path):
    img = make_images(tmp_path, ["a b.png"])[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(tiny_bundle), "--json",
                           str(img)], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (row,) = json_lines(proc.stdout)
    assert row["path"] == str(img)


def test_unreadable_file_fails_cleanly(tiny_bundle, tmp_path, capsys):
    """An image this process may not read is reported and the others are still inspected. As root (CI) it runs
    as an unprivileged user: root reads every file whatever its mode."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="unreadable-"))      # pytest's tmp_path is private to root
    try:
        shared.chmod(0o755)
        bundle = shared / "bundle"
        shutil.copytree(tiny_bundle, bundle)
        for path in [bundle, *bundle.iterdir()]:                    # written private (mkdtemp + rename)
            path.chmod(0o755 if path.is_dir() else 0o644)
        ok, img = make_images(shared, ["ok.png", "a.png"])
        img.chmod(0)
        argv = ["--models", str(bundle), "--threads", "1", str(ok), str(img)]
        if os.geteuid() != 0:
            code, err = main(argv), capsys.readouterr().err
        elif not hasattr(os, "setuid"):
            pytest.skip("running as root on a system without setuid: cannot drop privileges to test this")
        else:
            code, err = run_unprivileged(argv)
        assert code == 1, err
        assert f"{img}: " in err and "Permission denied" in err
        assert "1 inspected" in err and "1 failed" in err
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("module, argv, line", [
    ("edge_runtime.cli", ["--models", "B"], "edge-inspect: error: give image files or folders to inspect"),
    ("edge_runtime.cli", ["review", "--db", "x.sqlite3", "--http", "localhost"], "edge-inspect review: error: --http"),
    ("edge_runtime.cli", ["export-labels", "--out", "o"], "edge-inspect export-labels: error: give the service's "
                                                          "config with --config FILE or its database with --db PATH"),
    ("edge_runtime.cli", ["adapt", "--db", "x", "--out", "o", "--folds", "1"],
     "edge-inspect adapt: error: --fab-weight must be > 0 and --folds >= 2"),
    ("central.collector", ["--broker", "h:1", "--db", "x", "--batch", "0"], "collect: error: --batch must be 1..10000"),
    ("central.collector", ["--broker", "h", "--db", "x"], "collect: error: "),
    ("central.api", ["--db", "x", "--listen", "nowhere"], "python -m central.api: error: --listen: "),
    ("central.rollout", ["pack", "missing-bundle", "--out", "o"], "rollout pack: error: "),
])
def test_every_command_says_an_expected_error_in_one_line_and_exits_2(module, argv, line, tmp_path, monkeypatch,
                                                                       capsys):
    """The one command skeleton (edge_runtime/command.py): `PROG: error: MESSAGE`, one line, exit 2."""
    import importlib

    from edge_runtime.exits import EXIT_SETUP

    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(module).main(argv) == EXIT_SETUP
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not list(tmp_path.iterdir()), "nothing is created"


def test_the_command_skeleton_turns_expected_errors_into_their_exit_code(capsys):
    import argparse

    from edge_runtime.command import CommandError, add_log_level, reported, run_command
    from edge_runtime.exits import EXIT_STORAGE

    parser = argparse.ArgumentParser()
    add_log_level(parser)

    def body(args):
        assert args.log_level == "WARNING"
        with reported(OSError, prefix="--out: ", code=EXIT_STORAGE):
            raise OSError("disk full")

    assert run_command("tool", parser, body, ["--log-level", "WARNING"]) == EXIT_STORAGE
    assert capsys.readouterr().err == "tool: error: --out: disk full\n"

    def unexpected(args):
        raise KeyError("a bug is not an expected error")

    with pytest.raises(KeyError):
        run_command("tool", parser, unexpected, [])

    def fails(args):
        raise CommandError("x", 1)

    assert run_command(lambda args: f"tool {args.log_level}", parser, fails, []) == 1   # PROG from the flags
    assert capsys.readouterr().err == "tool INFO: error: x\n"
