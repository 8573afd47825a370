"""`python -m train prepare`: layouts, alias mapping, bad files, duplicates, group-aware split, outputs.

Every fixture tree is built here from PIL-generated images in tmp_path.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.config import load_config
from train.datasets import (DatasetError, SplitError, detect_layout, read_split, scan_source, stage_view)
from train.split import assign_splits
from tests.support.datasets import make_master, read_rows, run_prepare, save, smooth_image

CFG = load_config()


# ---- fixture helpers -------------------------------------------------------------------------------------
def tree_fingerprint(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": () for p in sorted(root.rglob("*")) if p.is_dir()}


# ---- read_split / stage_view -----------------------------------------------------------------------------
def test_read_split_and_stage_views(tmp_path):
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("path,label,split\n/a.png,clean,train\n/b.png,bridges,val\n/c.png,vias,test\n")
    samples = read_split(csv_path)
    assert [(s.path, s.label, s.split) for s in samples] == [
        ("/a.png", "clean", "train"), ("/b.png", "bridges", "val"), ("/c.png", "vias", "test")]
    assert stage_view(samples, "stage1") == [("/a.png", "clean"), ("/b.png", "defective"), ("/c.png", "defective")]
    assert stage_view(samples, "stage2") == [("/b.png", "bridges"), ("/c.png", "vias")]
    assert stage_view(samples, "master") == [("/a.png", "clean"), ("/b.png", "bridges"), ("/c.png", "vias")]
    with pytest.raises(ValueError, match="unknown view"):
        stage_view(samples, "stage3")


@pytest.mark.parametrize("text, message", [
    ("file,label,split\n/a.png,clean,train\n", "columns must be exactly"),
    ("path,label,split\n/a.png,scratch,train\n", "not a taxonomy class"),
    ("path,label,split\n/a.png,clean,holdout\n", "split 'holdout'"),
    ("path,label,split\n", "no rows"),
])
def test_read_split_rejects_bad_files(tmp_path, text, message):
    csv_path = tmp_path / "split.csv"
    csv_path.write_text(text)
    with pytest.raises(SplitError, match=message):
        read_split(csv_path)
    with pytest.raises(SplitError, match="not found"):
        read_split(tmp_path / "missing.csv")


# ---- layouts and folder names ------------------------------------------------------------------------------
def test_layout_detection(tmp_path):
    master = make_master(tmp_path / "master", {"clean": 1, "bridges": 1})
    presplit = tmp_path / "presplit"
    for k, split in enumerate(("Train", "VALID", "test")):
        make_master(presplit / split, {"Clean": 1, "Crack": 1}, seed0=10 * k)
    notebook = tmp_path / "nb"
    make_master(notebook / "stage1_binary_dataset" / "Train", {"clean": 1})
    make_master(notebook / "stage2_multiclass_dataset" / "Train", {"bridge": 1}, seed0=50)
    assert detect_layout(master) == "master"
    assert detect_layout(presplit) == "presplit"
    assert detect_layout(notebook) == "notebook"
    scan = scan_source(presplit, CFG)
    assert scan.origin_splits == ["test", "train", "val"]
    assert {f.label for f in scan.files} == {"clean", "cracks"}
    assert {f.origin_split for f in scan.files} == {"train", "val", "test"}


def test_presplit_sources_are_resplit_and_noted(tmp_path, capsys):
    src = tmp_path / "src"
    for k, split in enumerate(("train", "Validation", "Test")):
        make_master(src / split, {"clean": 6, "opens": 6}, seed0=100 * k)
    code, out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["sources"][0]["layout"] == "presplit"
    assert audit["sources"][0]["origin_splits_ignored"] == ["test", "train", "val"]
    assert "split ignored" in out
    assert len(read_rows(tmp_path / "out")) == 36


def test_alias_mapping_of_folder_names(tmp_path, capsys):
    folders = {"Bridge": "bridges", "CRACKS": "cracks", "clean_layer": "clean", "CLEAN-VIA": "clean",
               "Particle": "other", "OTHERS": "other", "short": "shorts", "CMP": "scratches",
               "malformed_vias": "vias", "Open": "opens", "LER": "other"}
    src = make_master(tmp_path / "src", dict.fromkeys(folders, 2))
    code, _out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 2 * len(folders)
    for row in rows:
        folder = Path(row["path"]).parent.name
        assert row["label"] == folders[folder], row


def test_unknown_folder_stops_with_how_to_map_it(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 2, "blobs": 2, "Weird Thing": 1})
    code, _out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 2
    assert "'blobs'" in err and "'Weird Thing'" in err
    assert "aliases:" in err and '"blobs": <one of clean' in err
    assert not (tmp_path / "out" / "split.csv").exists()


def test_notebook_layout_clean_from_stage1_defects_from_stage2(tmp_path, capsys):
    nb = tmp_path / "nb"
    s1, s2 = nb / "stage1_binary_dataset", nb / "stage2_multiclass_dataset"
    seed = 0
    for split in ("Train", "Validation", "Test"):
        for k in range(4):
            save(s1 / split / "clean" / f"c{seed}.png", smooth_image(seed))
            seed += 1
        for cls in ("bridges", "cracks"):
            for k in range(4):
                img = smooth_image(seed)
                save(s2 / split / cls / f"{cls}{seed}.png", img)
                save(s1 / split / "defective" / f"{cls}{seed}.png", img)   # same file, no class
                seed += 1
        # The notebook also kept the clean images in stage 2: byte-identical copies.
        for p in (s1 / split / "clean").iterdir():
            (s2 / split / "clean").mkdir(parents=True, exist_ok=True)
            (s2 / split / "clean" / p.name).write_bytes(p.read_bytes())
    code, _out, err = run_prepare(capsys, "--data", nb, "--out", tmp_path / "out")
    assert code == 0, err
    rows = read_rows(tmp_path / "out")
    labels = [r["label"] for r in rows]
    assert labels.count("clean") == 12 and labels.count("bridges") == 12 and labels.count("cracks") == 12
    assert not any("/defective/" in r["path"] for r in rows)
    clean_paths = [r["path"] for r in rows if r["label"] == "clean"]
    assert all("stage1_binary_dataset" in p for p in clean_paths)       # one copy of each, from stage 1
    assert all("stage2_multiclass_dataset" in r["path"] for r in rows if r["label"] != "clean")
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["sources"][0]["layout"] == "notebook"
    assert audit["counts"]["exact_copies_dropped"] == 12
    assert audit["notebook_stage1_defective"] == {"files": 24, "not_found_in_stage2": []}


# ---- bad input ---------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_bad_files_are_listed_and_skipped(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 4, "vias": 4})
    bad = src / "vias"
    (bad / "zero.png").write_bytes(b"")
    good = (src / "vias" / "img_000.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "text.png").write_text("this is not an image\n")
    (bad / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    (bad / "notes.txt").write_text("scan notes")
    (src / "README.md").write_text("stray file at the top")
    code, out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    reasons = {Path(x["path"]).name: x["reason"] for x in audit["skipped"]}
    assert "empty" in reasons["zero.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "not an image" in reasons["text.png"]
    assert "too large" in reasons["huge.png"]
    assert reasons["notes.txt"] == "unsupported type"
    assert reasons["README.md"] == "not inside a class folder"
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 8 and not any(Path(r["path"]).name in reasons for r in rows)
    assert "## Skipped files" in out and "truncated.png" in out


def test_missing_and_empty_data_folders_exit_2(tmp_path, capsys):
    code, _out, err = run_prepare(capsys, "--data", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "not found" in err
    (tmp_path / "empty").mkdir()
    code, _out, err = run_prepare(capsys, "--data", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "no usable images" in err
    (tmp_path / "empty" / "clean").mkdir()
    (tmp_path / "empty" / "clean" / "x.txt").write_text("x")
    code, _out, err = run_prepare(capsys, "--data", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "no usable images" in err
    assert not (tmp_path / "out").exists()


def test_only_unreadable_files_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "clean").mkdir(parents=True)
    (src / "clean" / "a.png").write_bytes(b"")
    (src / "clean" / "b.png").write_text("not a png")
    code, _out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 2 and "none of the 2 image files could be read" in err and "b.png: not an image" in err


def test_out_inside_data_is_refused(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 2})
    code, _out, err = run_prepare(capsys, "--data", src, "--out", src / "prepared")
    assert code == 2 and "never written" in err
    assert not (src / "prepared").exists()


def test_source_folder_is_never_modified(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 5, "cracks": 5})
    (src / "cracks" / "zero.png").write_bytes(b"")
    (src / "cracks" / "copy.png").write_bytes((src / "cracks" / "img_000.png").read_bytes())
    before = tree_fingerprint(src)
    code, _out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    assert tree_fingerprint(src) == before


# ---- duplicates, conflicts, split --------------------------------------------------------------------------
def test_exact_and_near_duplicates_across_sources_share_a_split(tmp_path, capsys):
    a = make_master(tmp_path / "a", {"clean": 10, "bridges": 10})
    b = tmp_path / "b"
    target = smooth_image(3)                                   # a/clean/img_003.png
    save(b / "clean" / "resized_rgb.png", target, mode="RGB", size=150)
    save(b / "clean" / "palette.png", target, mode="P", size=40)
    (b / "clean" / "exact.png").write_bytes((a / "clean" / "img_003.png").read_bytes())
    make_master(b, {"bridges": 3}, seed0=500)
    code, out, err = run_prepare(capsys, "--data", a, "--data", b, "--out", tmp_path / "out")
    assert code == 0, err
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    groups = [g for g in audit["near_duplicate_groups"]
              if any(m["path"].endswith("img_003.png") and "/clean/" in m["path"] for m in g["members"])]
    assert len(groups) == 1
    names = sorted(Path(m["path"]).name for m in groups[0]["members"])
    assert names == ["exact.png", "img_003.png", "palette.png", "resized_rgb.png"]
    assert groups[0]["sources"] == [0, 1]
    assert audit["counts"]["duplicate_groups"] == 1           # distinct images are not grouped
    assert [len(g["paths"]) for g in audit["exact_duplicate_groups"]] == [2]
    rows = read_rows(tmp_path / "out")
    paths = {r["path"]: r["split"] for r in rows}
    assert str((b / "clean" / "exact.png").resolve()) not in paths    # one representative only
    group_splits = {paths[m["path"]] for m in groups[0]["members"] if m["path"] in paths}
    assert len(group_splits) == 1
    assert audit["counts"]["cross_source_images"] == [[0, 1], [3, 0]]
    assert "Cross-source near duplicates" in out


def test_conflicting_labels_are_excluded(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"bridges": 6, "cracks": 6})
    (src / "cracks" / "same_as_bridge.png").write_bytes((src / "bridges" / "img_001.png").read_bytes())
    save(src / "clean" / "near_bridge.png", smooth_image(2), size=90)    # bridges/img_002 resized
    make_master(src, {"clean": 3}, seed0=900)
    code, out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["counts"]["label_conflict_groups"] == 2
    assert sorted(tuple(g["labels"]) for g in audit["conflicts"]) == [("bridges", "clean"), ("bridges", "cracks")]
    excluded = {m["path"] for g in audit["conflicts"] for m in g["members"]}
    assert len(excluded) == 4
    rows = read_rows(tmp_path / "out")
    assert not excluded & {r["path"] for r in rows}
    assert len(rows) == 6 + 7 + 1 + 3 - 4
    assert "## Label conflicts" in out and "bridges, cracks" in out


def test_flat_images_group_only_when_equal(tmp_path, capsys):
    src = tmp_path / "src"
    for k, value in enumerate((40, 41, 120, 200)):
        save(src / "clean" / f"flat_{k}.png", np.full((50, 50), value, np.uint8))
    Image.fromarray(np.full((50, 50), 120, np.uint8)).save(src / "clean" / "flat_same.bmp")
    make_master(src, {"opens": 3})
    code, _out, err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0, err
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    groups = [sorted(Path(m["path"]).name for m in g["members"]) for g in audit["near_duplicate_groups"]]
    assert groups == [["flat_2.png", "flat_same.bmp"]]


def test_split_is_stratified_deterministic_and_group_aware(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 40, "bridges": 20, "scratches": 20})
    # Groups of resized copies inside the bridges class: each must stay whole.
    for g in range(4):
        for k in range(3):
            save(src / "bridges" / f"group{g}_copy{k}.png", smooth_image(5000 + g), size=50 + 17 * k)
    out1, out2, out3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    assert run_prepare(capsys, "--data", src, "--out", out1)[0] == 0
    assert run_prepare(capsys, "--data", src, "--out", out2)[0] == 0
    assert (out1 / "split.csv").read_bytes() == (out2 / "split.csv").read_bytes()
    other_seed = tmp_path / "seed7.yaml"
    other_seed.write_text(Path(CFG_PATH()).read_text().replace("seed: 42", "seed: 7"))
    assert run_prepare(capsys, "--data", src, "--out", out3, "--config", other_seed)[0] == 0
    assert (out1 / "split.csv").read_bytes() != (out3 / "split.csv").read_bytes()

    rows = read_rows(out1)
    split_of = {r["path"]: r["split"] for r in rows}
    for g in range(4):
        members = [p for p in split_of if f"/group{g}_copy" in p]
        assert len(members) == 3 and len({split_of[p] for p in members}) == 1
    counts = {}
    for r in rows:
        counts.setdefault(r["label"], {}).setdefault(r["split"], 0)
        counts[r["label"]][r["split"]] += 1
    assert counts["clean"] == {"train": 28, "val": 6, "test": 6}
    assert counts["scratches"] == {"train": 14, "val": 3, "test": 3}
    assert sum(counts["bridges"].values()) == 32 and all(counts["bridges"].get(s) for s in ("train", "val", "test"))
    summary = (out1 / "summary.md").read_text()
    assert "| clean     | 28    | 6   | 6    | 40    |" in summary
    assert "Warning" not in summary


def test_summary_warns_about_classes_missing_from_a_split(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 10, "shorts": 2})
    code, out, _err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0
    assert "Warning: shorts has no val images; shorts has no test images" in out


def CFG_PATH():
    from train.config import DEFAULT_CONFIG
    return DEFAULT_CONFIG


def test_assign_splits_keeps_every_group_whole():
    rng = np.random.default_rng(0)
    units, key = [], 0
    for label in ("clean", "bridges", "vias"):
        for _ in range(60):
            size = int(rng.choice([1, 1, 1, 2, 3, 7]))
            units.append((label, [f"{label}/{key + i}" for i in range(size)]))
            key += size
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = assign_splits(units, fractions, seed=1)
    assert a == assign_splits(list(reversed(units)), fractions, seed=1)   # input order does not matter
    assert a != assign_splits(units, fractions, seed=2)
    for _label, members in units:
        assert len({a[m] for m in members}) == 1
    for label in ("clean", "bridges", "vias"):
        n = sum(len(m) for lab, m in units if lab == label)
        got = {s: sum(1 for k, v in a.items() if k.startswith(label + "/") and v == s) for s in fractions}
        for s, f in fractions.items():
            assert abs(got[s] - f * n) <= 7, (label, got)   # within one largest group of the target


def test_outputs_are_valid_for_read_split(tmp_path, capsys):
    src = make_master(tmp_path / "src", {"clean": 8, "opens": 8, "vias": 8})
    code, out, _err = run_prepare(capsys, "--data", src, "--out", tmp_path / "out")
    assert code == 0
    assert (tmp_path / "out" / "split.csv").read_text().splitlines()[0] == "path,label,split"
    samples = read_split(tmp_path / "out" / "split.csv")
    assert len(samples) == 24 and all(os.path.isabs(s.path) and Path(s.path).is_file() for s in samples)
    assert len(stage_view(samples, "stage2")) == 16
    assert "| class " in out and "| **total** |" in out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# Dataset preparation summary")


def test_scan_source_error_types(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_source(tmp_path / "missing", CFG)


def test_python_m_train_prepare_entry_point(tmp_path):
    import subprocess
    import sys
    src = make_master(tmp_path / "src", {"clean": 3, "vias": 3})
    repo = Path(__file__).resolve().parent.parent
    ok = subprocess.run([sys.executable, "-m", "train", "prepare", "--data", str(src), "--out", str(tmp_path / "o")],
                        cwd=repo, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| **total** |" in ok.stdout and (tmp_path / "o" / "split.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "train", "prepare", "--data", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o2")], cwd=repo, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--data folder not found" in bad.stderr
