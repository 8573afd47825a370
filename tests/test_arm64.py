"""arm64 smoke test without a board: edge-inspect under qemu-aarch64 (deploy/arm64-smoke.sh) gives the same
labels and scores as on x86-64, for the int8 and float32 variants of a tiny bundle, on Debian 12 (Python 3.11)
and Debian 13 (Python 3.13, as Raspberry Pi OS has now) roots; tflite-runtime 2.14 on aarch64 runs the default
(per-tensor dense) bundle like LiteRT and refuses a per-channel one with exit 2 instead of crashing in it.

Skips with the script's reason where the machine cannot run it (no qemu-aarch64-static, not a Debian/apt
host, offline); a packaging failure (no aarch64 wheel for a dependency) fails. The aarch64 root and wheels are cached in ~/.cache/sem-inspect-arm64 (or
$SEM_INSPECT_ARM64_CACHE); $SEM_INSPECT_ARM64_QEMU picks the qemu (auto | trixie | a path) and
$SEM_INSPECT_ARM64_CPU the emulated core (default cortex-a72).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.images import make_pattern_images
from tests.support.inspect_output import rows_by_name
from tests.support.paths import REPO

SCRIPT = REPO / "deploy" / "arm64-smoke.sh"
CACHE = Path(os.environ.get("SEM_INSPECT_ARM64_CACHE", Path.home() / ".cache" / "sem-inspect-arm64"))
QEMU = os.environ.get("SEM_INSPECT_ARM64_QEMU", "auto")
CPU = os.environ.get("SEM_INSPECT_ARM64_CPU", "cortex-a72")     # Raspberry Pi 4's core
SKIP_STATUS = 77        # arm64-smoke.sh: this machine cannot run the test


def x86_run(bundle: Path, images: Path, variant: str) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(bundle), "--variant", variant,
                           "--runtime", "litert", "--threads", "1", "--json", str(images)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return rows_by_name(proc.stdout)


def arm64_proc(bundle: Path, images: Path, variant: str, suite: str = "bookworm",
               runtime: str = "litert") -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPT), "--cache", str(CACHE), "--qemu", QEMU, "--cpu", CPU,
                           "--python", sys.executable, "--suite", suite, "--runtime", runtime,
                           "--", "--models", str(bundle), "--variant", variant, "--threads", "1", "--json",
                           str(images)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode == SKIP_STATUS:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    return proc


def arm64_run(bundle: Path, images: Path, variant: str, suite: str = "bookworm",
              runtime: str = "litert") -> tuple[dict[str, dict], str]:
    proc = arm64_proc(bundle, images, variant, suite, runtime)
    assert proc.returncode == 0, f"arm64 edge-inspect failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    versions = [line for line in proc.stderr.splitlines() if line.startswith("[arm64-smoke] qemu")]
    return rows_by_name(proc.stdout), (versions[-1] if versions else "")


@pytest.fixture(scope="module")
def split_bundle(tiny_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny bundle with its gating moved between the x86 scores, so that the images land on both sides of
    the Stage-1 threshold and the review floor: a one-step difference on arm64 would change labels."""
    if shutil.which("qemu-aarch64-static") is None and shutil.which("qemu-aarch64") is None and QEMU == "auto":
        pytest.skip("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    root = tmp_path_factory.mktemp("arm64")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    images = root / "images"
    make_pattern_images(images)
    rows = x86_run(bundle, images, "int8").values()
    manifest_path = bundle / "manifest.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())

    def between(values):
        distinct = sorted(set(values))
        if len(distinct) < 2:
            return None
        mid = len(distinct) // 2
        return round((distinct[mid - 1] + distinct[mid]) / 2, 6)

    threshold = between([r["stage1_score"] for r in rows])
    if threshold is not None:
        manifest["gating"]["stage1_threshold"] = threshold
    floor = between([r["confidence"] for r in rows if r["defect_class"]])
    if floor is not None:
        manifest["gating"]["stage2_review_floor"] = floor
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return bundle, images


@pytest.mark.slow
@pytest.mark.parametrize("suite, runtime", [("bookworm", "litert"), ("trixie", "litert"),
                                            ("bookworm", "tflite-runtime")],
                         ids=["debian12-py3.11-litert", "debian13-py3.13-litert", "debian12-py3.11-tflite-runtime"])
def test_int8_results_match_x86_64(split_bundle, suite, runtime):
    bundle, images = split_bundle
    x86 = x86_run(bundle, images, "int8")
    labels = {r["label"] for r in x86.values()}
    assert "clean" in labels and labels - {"clean"}, f"the gating split did not work: {labels}"
    arm, versions = arm64_run(bundle, images, "int8", suite, runtime)
    assert sorted(arm) == sorted(x86), "arm64 did not report every image"
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    steps = {1: manifest["variants"]["int8"]["stage1"]["output"]["scale"],
             2: manifest["variants"]["int8"]["stage2"]["output"]["scale"]}
    exact = 0
    for name, a in x86.items():
        b = arm[name]
        assert (b["label"], b["defect_class"], b["review"]) == (a["label"], a["defect_class"], a["review"]), name
        # Scores are dequantized int8 outputs: allow at most one quantization step (measured: identical).
        assert abs(b["stage1_score"] - a["stage1_score"]) <= steps[1] + 1e-6, (name, a, b)
        step = steps[2] if a["defect_class"] else steps[1]
        assert abs(b["confidence"] - a["confidence"]) <= step + 1e-6, (name, a, b)
        exact += (b["stage1_score"], b["confidence"]) == (a["stage1_score"], a["confidence"])
    print(f"\n{versions}: int8 {exact}/{len(x86)} images bit-identical to x86-64 LiteRT, labels all equal")


def test_tflite_runtime_on_arm64_refuses_per_channel_dense_layers(tiny_bundle_per_channel, tmp_path):
    """tflite-runtime 2.14 segfaults in a per-channel int8 FULLY_CONNECTED without a bias on aarch64; the
    manifest's minimum (2.16.0 for per-channel dense layers) makes it refuse the bundle first: one line, exit 2."""
    if shutil.which("qemu-aarch64-static") is None and shutil.which("qemu-aarch64") is None and QEMU == "auto":
        pytest.skip("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    images = tmp_path / "images"
    make_pattern_images(images)
    proc = arm64_proc(tiny_bundle_per_channel, images, "int8", "bookworm", "tflite-runtime")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    refusal = [line for line in proc.stderr.splitlines() if line.startswith("edge-inspect: error:")]
    assert len(refusal) == 1 and "needs tflite-runtime >= 2.16.0, this is tflite-runtime 2.14.0" in refusal[0]


def test_float32_results_match_x86_64(split_bundle):
    bundle, images = split_bundle
    x86 = x86_run(bundle, images, "float32")
    arm, versions = arm64_run(bundle, images, "float32")
    assert sorted(arm) == sorted(x86), "arm64 did not report every image"
    threshold = yaml.safe_load((bundle / "manifest.yaml").read_text())["gating"]["stage1_threshold"]
    worst = 0.0
    for name, a in x86.items():
        b = arm[name]
        # The scores are rounded to 6 decimals in the JSON; ARM and x86 kernels may differ in the last float bits.
        for key in ("stage1_score", "confidence"):
            worst = max(worst, abs(b[key] - a[key]))
            assert abs(b[key] - a[key]) <= 1e-5, (name, key, a, b)
        if abs(a["stage1_score"] - threshold) > 1e-5:     # a label right at the threshold may legitimately flip
            assert b["label"] == a["label"], (name, a, b)
    print(f"\n{versions}: float32 largest score difference {worst:g}")


NO_WHEEL = """\
ERROR: Could not find a version that satisfies the requirement ai-edge-litert<3,>=2.0 (from versions: none)
ERROR: No matching distribution found for ai-edge-litert<3,>=2.0
"""
OFFLINE = """\
WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by \
'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object>: Failed to establish a new connection: \
[Errno -3] Temporary failure in name resolution')': /simple/numpy/
ERROR: Could not find a version that satisfies the requirement numpy<3,>=1.24 (from versions: none)
ERROR: No matching distribution found for numpy<3,>=1.24
"""


def stand_ins(tmp_path: Path, pip_says: str) -> tuple[Path, Path]:
    """A Python whose `pip download` answers `pip_says` and fails, and a qemu that only reports its version."""
    missing = [tool for tool in ("apt-get", "apt-config", "dpkg", "flock") if shutil.which(tool) is None]
    if missing or not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file():
        pytest.skip(f"not a Debian/apt host ({missing or 'no debian-archive-keyring'}): the script stops earlier")
    (tmp_path / "pip-says.txt").write_text(pip_says)
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\n"
                      f'if [[ "$1 $2 $3" == "-m pip download" ]]; then cat {shlex.quote(str(tmp_path / "pip-says.txt"))}; '
                      "exit 1; fi\n"
                      f'exec {shlex.quote(sys.executable)} "$@"\n')
    qemu = tmp_path / "qemu-aarch64"
    qemu.write_text("#!/bin/sh\necho 'qemu-aarch64 version 8.2.2'\n")
    for exe in (python, qemu):
        exe.chmod(0o755)
    return python, qemu


@pytest.mark.parametrize("pip_says, status", [(NO_WHEEL, 2), (OFFLINE, SKIP_STATUS)], ids=["no-wheel", "offline"])
def test_missing_aarch64_wheel_fails_and_only_offline_skips(tmp_path, pip_says, status):
    """pip's answer decides: no aarch64 wheel is a packaging failure (exit 2: the smoke test fails, as a board's
    install would), unreachable index is this machine's limit (exit 77: skip). pip and qemu are stand-ins here
    (a pip download that answers `pip_says`, a qemu that only reports its version); the rest is the script."""
    python, qemu = stand_ins(tmp_path, pip_says)
    proc = subprocess.run(["bash", str(SCRIPT), "--cache", str(tmp_path / "cache"), "--qemu", str(qemu),
                           "--python", str(python), "--setup-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    if status == 2:
        assert "packaging failure" in proc.stderr and "ai-edge-litert<3,>=2.0 (from versions: none)" in proc.stderr
    else:
        assert "cannot reach the package index" in proc.stderr
    assert not (tmp_path / "cache" / "root").exists()      # stopped before fetching the arm64 Python


FAB_LIST = "# the fab's mirror\ndeb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.fab.example/debian/ bookworm main\n"
FAB_SOURCES = """Types: deb
URIs: http://mirror.fab.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""
UBUNTU_LIST = "deb http://archive.ubuntu.com/ubuntu jammy main universe\n"


@pytest.mark.parametrize("sources, option, expected", [
    ((FAB_LIST, FAB_SOURCES), [],
     "Debian archive: http://mirror.fab.example/debian (this machine's apt sources, {etc}/sources.list); "
     "security: http://mirror.fab.example/debian-security"),
    ((FAB_LIST, FAB_SOURCES), ["--mirror", "http://other.example/debian"],
     "Debian archive: http://other.example/debian (--mirror); security: none"),
    ((UBUNTU_LIST, ""), [],
     "Debian archive: http://deb.debian.org/debian (default: this machine's apt sources name no Debian archive); "
     "security: http://deb.debian.org/debian-security"),
], ids=["host-sources", "option", "no-debian-sources"])
def test_debian_archive_is_the_hosts_unless_an_option_says_otherwise(tmp_path, sources, option, expected):
    """The host's apt sources (one-line and deb822, disabled entries skipped) name the archive, as behind a
    fab's internal mirror; --mirror overrides them. apt-config reads APT_CONFIG, which points at a test copy of
    Dir::Etc here; the script stops at the (stand-in) wheel download, after saying which archive it uses."""
    python, qemu = stand_ins(tmp_path, NO_WHEEL)
    etc = tmp_path / "etc"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(sources[0])
    (etc / "sources.list.d" / "fab.sources").write_text(sources[1])
    (tmp_path / "apt.conf").write_text(f'Dir::Etc::sourcelist "{etc}/sources.list";\n'
                                       f'Dir::Etc::sourceparts "{etc}/sources.list.d";\n')
    env = dict(os.environ, APT_CONFIG=str(tmp_path / "apt.conf"))
    proc = subprocess.run(["bash", str(SCRIPT), "--cache", str(tmp_path / "cache"), "--qemu", str(qemu),
                           "--python", str(python), *option, "--setup-only"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"[arm64-smoke] {expected.format(etc=etc)}\n" in proc.stderr
