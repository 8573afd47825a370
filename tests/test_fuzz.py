"""Seeded fuzz: corrupt images under hostile names, fed to one-off `edge-inspect --json` and to the watch service.

Seeds are small valid PNG/TIFF/JPEG/BMP files in the modes an SEM tool or a viewer writes; each fuzzed file is a
seed with random byte flips, a cut, inserted garbage, or a damaged TIFF directory entry / PNG chunk length, and a
name drawn from plain, spaced, non-ASCII, not-UTF-8, newline-carrying and very long names. Both modes run as
real processes under a time limit (a hang fails the test). Properties: no crash and no traceback; one-off
answers once per file, in valid UTF-8 JSON whose path gives back the exact name; the service records every
file exactly once, inspected or quarantined, each quarantined one with its reason in the database and in
NAME.reason.txt, and leaves nothing behind. The run is fixed by the seed (FUZZ_SEED, default 0) and bounded
(FUZZ_FILES files, default 2000: about 15 s here).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import REPO
from tests.support.watch import rows

SEED = int(os.environ.get("FUZZ_SEED", "0"))
N_FILES = int(os.environ.get("FUZZ_FILES", "2000"))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def seed_files() -> list[tuple[str, bytes]]:
    """(suffix, bytes) of small valid images in the formats and modes the product accepts."""
    rng = np.random.default_rng(SEED)
    gray = rng.integers(0, 256, (28, 36), dtype=np.uint8)
    out = []

    def save(img, suffix, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append((suffix, buf.getvalue()))
    save(Image.fromarray(gray), ".png", "PNG")
    save(Image.fromarray(gray).convert("RGBA"), ".png", "PNG")
    save(Image.fromarray(gray.astype(np.uint16) * 257), ".png", "PNG")
    save(Image.fromarray(gray), ".tif", "TIFF")
    save(Image.fromarray(gray.astype(np.uint16) * 257), ".tiff", "TIFF")
    save(Image.fromarray(gray).convert("RGB"), ".tif", "TIFF", compression="tiff_deflate")
    save(Image.fromarray(gray), ".tif", "TIFF", compression="tiff_lzw")
    save(Image.fromarray(gray.astype(np.float32) / 255), ".tif", "TIFF")
    save(Image.fromarray(gray).convert("RGB"), ".jpg", "JPEG", quality=90)
    save(Image.fromarray(gray), ".jpeg", "JPEG", progressive=True)
    save(Image.fromarray(gray).convert("P"), ".bmp", "BMP")
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.choice(["flip", "flip", "header", "cut", "insert", "tiff_entry", "png_length"])
    if kind in ("flip", "header"):
        span = min(len(d), 512) if kind == "header" else len(d)
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(span)] = rng.randrange(256)
    elif kind == "cut":
        del d[rng.randrange(1, len(d)):]
    elif kind == "insert":
        at = rng.randrange(len(d))
        d[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "tiff_entry" and d[:2] == b"II":
        ifd = struct.unpack_from("<I", d, 4)[0]
        if ifd + 2 <= len(d):
            count = struct.unpack_from("<H", d, ifd)[0]
            entry = ifd + 2 + 12 * rng.randrange(max(count, 1))
            if entry + 12 <= len(d):        # a random type, count or value for one directory entry
                field = rng.choice([2, 4, 8])
                size = 2 if field == 2 else 4
                struct.pack_into("<H" if size == 2 else "<I", d, entry + field,
                                 rng.choice([0, 1, 2, 5, 11, 12, 0xFFFF if size == 2 else 0xFFFFFFFF,
                                             rng.randrange(1 << (8 * size))]))
    elif kind == "png_length" and d[:4] == b"\x89PNG":
        struct.pack_into(">I", d, 8 + rng.choice([0, 25]), rng.choice([0, 1, 0x7FFFFFFF, rng.randrange(1 << 32)]))
    else:
        d[rng.randrange(len(d))] ^= 0xFF
    return bytes(d)


def hostile_name(i: int, suffix: str, rng: random.Random) -> str:
    style = rng.choice(["plain", "space", "unicode", "not utf-8", "newline", "long", "dash", "upper"])
    base = {"plain": f"fuzz{i:03d}", "space": f"fuzz {i:03d} lot 7", "unicode": f"fuzz{i:03d} ünï 日本",
            "not utf-8": os.fsdecode(f"fuzz{i:03d} ".encode() + bytes([0x80 + rng.randrange(0x40), 0xFF])),
            "newline": f"fuzz{i:03d}\nINFO forged line", "long": f"fuzz{i:03d}" + "x" * 236,
            "dash": f"-fuzz{i:03d}", "upper": f"FUZZ{i:03d}"}[style]
    return base + (suffix.upper() if style == "upper" else suffix)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Path:
    rng = random.Random(SEED)
    seeds = seed_files()
    folder = tmp_path_factory.mktemp("fuzz") / "in"
    folder.mkdir()
    for i in range(N_FILES):
        suffix, data = seeds[i % len(seeds)]
        (folder / hostile_name(i, suffix, rng)).write_bytes(mutate(data, rng))
    return folder


def fuzz_names(folder: Path) -> set[bytes]:
    return {os.fsencode(n) for n in os.listdir(folder)}


def test_fuzz_one_off_answers_every_file_once_without_crash_or_hang(tiny_bundle, fuzzed):
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(tiny_bundle), "--json",
                           "--threads", "1", str(fuzzed)], capture_output=True, cwd=REPO, env=ENV, timeout=180)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode in (0, 1) and "Traceback" not in err, err[-4000:]
    answers = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]     # strict UTF-8
    assert sorted(os.fsencode(a["path"]) for a in answers) == sorted(os.fsencode(str(fuzzed / os.fsdecode(n)))
                                                                      for n in fuzz_names(fuzzed))
    for a in answers:
        assert ("label" in a) != ("error" in a) and (a.get("error") or a.get("label")), a
    print(f"seed {SEED}: {sum('error' in a for a in answers)} of {len(answers)} refused")


def test_fuzz_watch_records_every_file_once_with_a_reason_for_each_refusal(tiny_bundle, fuzzed, tmp_path):
    watch = tmp_path / "in"
    shutil.copytree(fuzzed, watch)
    names = fuzz_names(watch)
    db = tmp_path / "results.sqlite3"
    cmd = [sys.executable, "-m", "edge_runtime.cli", "--models", str(tiny_bundle), "--watch", str(watch), "--once",
           "--processed", str(tmp_path / "done"), "--quarantine", str(tmp_path / "bad"), "--db", str(db),
           "--jsonl", str(tmp_path / "results.jsonl"), "--settle-seconds", "0", "--incomplete-seconds", "0",
           "--summary-seconds", "0", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, cwd=REPO, env=ENV, timeout=180)
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in log, log[-4000:]
    recorded = rows(db)
    assert len(recorded) == len(names) and len({r["key"] for r in recorded}) == len(names)
    assert sorted(r["name"] for r in recorded) == sorted(n.decode("utf-8", "backslashreplace") for n in names)
    quarantined = [r for r in recorded if r["outcome"] == "quarantined"]
    for r in recorded:
        assert Path(r["dest_path"]).is_file() and r["state"] == "done", r
    for r in quarantined:
        assert r["reason"], r
        assert r["reason"] in Path(r["dest_path"] + ".reason.txt").read_text(), r
    assert os.listdir(watch) == []
    (tmp_path / "results.jsonl").read_bytes().decode("utf-8")
    print(f"seed {SEED}: {len(quarantined)} of {len(recorded)} quarantined")
