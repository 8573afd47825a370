"""deploy/: the systemd unit, its config, the install script, the on-device benchmark script and the container.

Tools that are not Python packages are used where installed and otherwise skipped with the reason:
systemd-analyze (apt: systemd), shellcheck (apt: shellcheck), rsync (apt: rsync).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_runtime.config.service_config import ConfigError, load_service_config
from tests.support.deploy import (DEPLOY, UNIT, one, run_install, system_python, unit_entries, verifiable_unit,
                                  verify_unit)
from tests.support.paths import REPO

SERVICE_YAML = DEPLOY / "service.yaml"
BENCH = DEPLOY / "bench-on-device.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"wafer_{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------
# systemd unit
# ---------------------------------------------------------------------------------------------------------
def test_unit_runs_the_watch_service_hardened_and_restartable():
    e = unit_entries(UNIT.read_text())
    assert one(e, "Service.ExecStart").split() == ["/opt/sem-inspect/venv/bin/edge-inspect", "--config",
                                                   "/etc/sem-inspect/service.yaml"]
    assert one(e, "Service.Restart") == "on-failure"
    assert one(e, "Service.RestartSec")
    assert one(e, "Service.RestartPreventExitStatus") == "2"      # edge-inspect: setup error, a person must fix it
    assert one(e, "Service.User") not in ("", "root", "0") and one(e, "Service.Group") not in ("", "root", "0")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_UNIX", "StandardOutput": "journal",
                       "StandardError": "journal", "KillSignal": "SIGTERM"}.items():
        assert one(e, f"Service.{key}") == value, key
    assert re.fullmatch(r"\d+(s|min)?", one(e, "Service.TimeoutStopSec"))
    assert re.fullmatch(r"\d+[KMG]", one(e, "Service.MemoryMax"))
    assert one(e, "Install.WantedBy") == "multi-user.target"


def test_unit_can_write_every_folder_the_config_writes():
    """ProtectSystem=strict makes everything read-only but ReadWritePaths: each folder service.yaml writes to
    must be listed, or the service fails on its first image."""
    e = unit_entries(UNIT.read_text())
    writable = [Path(p) for value in e["Service.ReadWritePaths"] for p in value.split()]
    cfg = load_service_config(SERVICE_YAML)
    needed = [Path(cfg.watch), Path(cfg.processed), Path(cfg.quarantine), Path(cfg.db).parent,
              Path(cfg.jsonl).parent]
    for folder in needed:
        assert any(folder == w or w in folder.parents for w in writable), f"{folder} is not in ReadWritePaths"
    # ...and nothing broader than the data folders (the bundle and config stay read-only).
    assert all(str(w).startswith("/var/lib/sem-inspect/") for w in writable), writable


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_unit_passes_systemd_analyzeverify_unit(tmp_path):
    unit = verifiable_unit(tmp_path, UNIT.read_text())
    proc = verify_unit(unit)
    # verify exits 0 on unknown keys and bad values, printing them: any output is a finding.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    # The check is live here: a misspelt key and a bad value are reported.
    bad = verifiable_unit(tmp_path / "bad", UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes")
                           .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    out = verify_unit(bad)
    assert "sometimes" in out.stdout + out.stderr and "NoNewPrivilege" in out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_unit_exposure_is_low(tmp_path):
    """systemd's own hardening score: 0 (locked down) .. 10 (unprotected); the unit must stay <= 2.0."""
    unit = verifiable_unit(tmp_path, UNIT.read_text())
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    overall = [line for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert overall, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------
# service.yaml
# ---------------------------------------------------------------------------------------------------------
def test_service_yaml_is_accepted_by_the_runtime_config_loader(tmp_path):
    cfg = load_service_config(SERVICE_YAML)       # unknown keys and wrong types raise ConfigError
    assert cfg.models == "/opt/sem-inspect/models/current"
    assert cfg.watch == "/var/lib/sem-inspect/incoming"
    assert cfg.processed and cfg.quarantine and cfg.db and cfg.jsonl
    assert cfg.durability == "full" and not cfg.leave_in_place
    # The loader is strict, so this test means something: a misspelt key is refused.
    raw = yaml.safe_load(SERVICE_YAML.read_text())
    assert set(raw) <= {f for f in cfg.__dataclass_fields__}
    bad = dict(raw, setle_seconds=2.0)
    path = tmp_path / "bad-service.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="setle_seconds"):
        load_service_config(path)


def test_service_yaml_runs_the_watch_service(tiny_bundle, tmp_path):
    """The example config, with its paths moved under tmp_path, drives a real `edge-inspect --config --once`."""
    text = SERVICE_YAML.read_text().replace("/var/lib/sem-inspect", str(tmp_path / "data"))
    text = text.replace("/opt/sem-inspect/models/current", str(tiny_bundle))
    config = tmp_path / "service.yaml"
    config.write_text(text)
    images = make_images(tmp_path / "data" / "incoming", 3)
    (tmp_path / "data" / "incoming" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    # --incomplete-seconds 1: broken.png is quarantined once left alone that long (the shipped 60 s would only
    # make the test wait)
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--config", str(config), "--once",
                           "--threads", "1", "--incomplete-seconds", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "processed").iterdir()) == sorted(p.name for p in images)
    assert (tmp_path / "data" / "quarantine" / "broken.png").exists()
    results = [json.loads(line) for line in (tmp_path / "data" / "db" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 4 and (tmp_path / "data" / "db" / "results.sqlite3").exists()


# ---------------------------------------------------------------------------------------------------------
# Shell scripts
# ---------------------------------------------------------------------------------------------------------
def test_deploy_scripts_exist_and_are_executable():
    names = {p.name for p in SCRIPTS}
    assert {"install.sh", "bench-on-device.sh", "arm64-smoke.sh"} <= names
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, script.name
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script.name


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    proc = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout


def test_install_dry_run_shows_every_step_and_changes_nothing(tiny_bundle, tmp_path):
    python = system_python()
    if python is None:
        pytest.skip("no system Python 3.11/3.12 with venv outside /root and /home (install.sh needs one)")
    prefix, data, conf = tmp_path / "opt", tmp_path / "data", tmp_path / "etc"
    proc = run_install("--dry-run", "--bundle", str(tiny_bundle), "--python", python, "--prefix", str(prefix),
                       "--data-dir", str(data), "--config-dir", str(conf))
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{python} -m venv {prefix}/venv" in out
    assert re.search(r"pip .*install --quiet \S+/src\\\[edge\\\]", out), out     # the edge extra only
    assert "tensorflow" not in out.lower().replace("no tensorflow", "")
    assert "would check: " in out and "load_backend" in out                          # interpreter check
    assert "useradd --system" in out and "--shell /usr/sbin/nologin" in out
    assert f"install -d -m 2770 -o sem-inspect -g sem-inspect {data}/incoming" in out
    assert f"{prefix}/models/current" in out
    assert f"{conf}/service.yaml" in out
    for command in ("systemctl daemon-reload", "systemctl enable sem-inspect.service",
                    "systemctl restart sem-inspect.service"):
        assert command in out
    assert not prefix.exists() and not data.exists() and not conf.exists()


def test_install_refuses_bad_input_with_clear_messages(tmp_path):
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    proc = run_install("--dry-run", "--bundle", str(not_bundle))
    assert proc.returncode != 0 and "no manifest.yaml" in proc.stderr
    proc = run_install("--dry-run", "--frobnicate")
    assert proc.returncode != 0 and "unknown option: --frobnicate" in proc.stderr
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\necho 3.9\n")
    old.chmod(0o755)
    proc = run_install("--dry-run", "--python", str(old))
    assert proc.returncode != 0
    assert "3.11" in proc.stderr and "deadsnakes" in proc.stderr and "pyenv" in proc.stderr


@pytest.mark.skipif(not sys.base_prefix.startswith(("/root/", "/home/")),
                    reason="this Python is not in a home folder")
def test_install_refuses_a_python_the_service_cannot_see():
    """ProtectHome=yes hides /root and /home from the service: a venv built on a pyenv Python there would not
    start. install.sh says so instead of installing a broken service."""
    proc = run_install("--dry-run", "--python", sys.executable)
    assert proc.returncode != 0 and "ProtectHome" in proc.stderr


def test_install_uninstall_dry_run(tmp_path):
    proc = run_install("--dry-run", "--uninstall", "--purge", "--prefix", str(tmp_path / "opt"),
                       "--data-dir", str(tmp_path / "data"), "--config-dir", str(tmp_path / "etc"))
    assert proc.returncode == 0, proc.stderr
    assert "Uninstalled." in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a real install runs as root")
def test_install_for_real_without_service_is_idempotent(tiny_bundle, tmp_path):
    """--no-service into a temporary prefix: a real venv, pip install .[edge], the interpreter check and the
    bundle check; the second run re-uses what is there."""
    python = system_python()
    if python is None:
        pytest.skip("no system Python 3.11/3.12 with venv outside /root and /home (install.sh needs one)")
    prefix = tmp_path / "opt"
    args = ("--no-service", "--bundle", str(tiny_bundle), "--python", python, "--prefix", str(prefix))
    build_existed = (REPO / "build").exists()
    first = run_install(*args, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "interpreter: litert" in first.stdout and "bundle ok:" in first.stdout
    venv_python = prefix / "venv" / "bin" / "python"
    no_tf = subprocess.run([str(venv_python), "-c", "import importlib.util as u; "
                            "print(u.find_spec('tensorflow') is None, u.find_spec('ai_edge_litert') is not None)"],
                           capture_output=True, text=True)
    assert no_tf.stdout.split() == ["True", "True"]
    assert (prefix / "models" / "current").resolve() == (prefix / "models" / tiny_bundle.name)
    second = run_install(*args, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing it" in second.stdout and "is already this bundle" in second.stdout
    if not build_existed:
        assert not (REPO / "build").exists(), "install.sh built inside the checkout (it must build from a copy)"
    inspect = subprocess.run([str(prefix / "venv" / "bin" / "edge-inspect"), "--models",
                              str(prefix / "models" / "current"), "--json",
                              *map(str, make_images(tmp_path / "imgs", 2))], capture_output=True, text=True)
    assert inspect.returncode == 0 and len(inspect.stdout.splitlines()) == 2, inspect.stderr


# ---------------------------------------------------------------------------------------------------------
# bench-on-device.sh, with a stand-in for ssh that runs the "remote" commands in a local folder
# ---------------------------------------------------------------------------------------------------------
FAKE_SSH = """#!/usr/bin/env bash
# Test double for ssh: runs the remote command locally in $FAKE_REMOTE_HOME (as sshd would, with bash -c).
set -euo pipefail
while [[ $# -gt 0 ]]; do
    case $1 in
        -o | -p | -i | -l) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
shift                                   # the host
echo "$*" >>"$FAKE_REMOTE_HOME/.ssh-commands"
cd "$FAKE_REMOTE_HOME"
exec bash -c "$*"
"""


def fake_ssh_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(0o755)
    home = tmp_path / "board-home"
    home.mkdir()
    # The board's python3.11: this test's interpreter family (a venv is made from it on the "board").
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_REMOTE_HOME=str(home))


def test_bench_on_device_dry_run_and_usage(tiny_bundle, tmp_path):
    env = fake_ssh_env(tmp_path)
    proc = subprocess.run(["bash", str(BENCH), "--dry-run", "--tar", "pi@board", str(tiny_bundle), "--",
                           "--threads", "1,4"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tar -C" in out and "sem-inspect-bench/src" in out
    # The printed ssh command, unquoted twice (local shell, then the board's): the benchmark's own arguments.
    ssh_lines = [shlex.split(line.strip()[1:]) for line in out.splitlines() if line.strip().startswith("+ ssh")]
    remote = [shlex.split(words[-1]) for words in ssh_lines if "benchmarks" in words[-1]]
    assert remote, out
    assert remote[0][remote[0].index("-m"):] [:4] == ["-m", "benchmarks", "--models", f"bundles/{tiny_bundle.name}"]
    assert remote[0][-2:] == ["--threads", "1,4"]
    assert not (Path(env["FAKE_REMOTE_HOME"]) / "sem-inspect-bench").exists()
    proc = subprocess.run(["bash", str(BENCH), "pi@board", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode != 0 and "not a model bundle" in proc.stderr


@pytest.mark.slow
def test_bench_on_device_round_trip(tiny_bundle, tmp_path):
    """Copy, venv with .[edge] on the 'board', benchmark there, results back; the second run re-uses the venv."""
    env = fake_ssh_env(tmp_path)
    home = Path(env["FAKE_REMOTE_HOME"])
    bench_args = ["--", "--threads", "1", "--runtime", "litert", "--runs", "5", "--max-seconds", "2",
                  "--light-gate", "off"]
    python = sys.executable
    copy_modes = (["--tar"], []) if shutil.which("rsync") else (["--tar"], ["--tar"])
    outs = []
    for i, mode in enumerate(copy_modes):
        out = tmp_path / f"results-{i}"
        proc = subprocess.run(["bash", str(BENCH), *mode, "--python", python, "--out", str(out), "pi@board",
                               str(tiny_bundle), *bench_args], capture_output=True, text=True, env=env,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert (out / "results.md").read_text().strip()
        assert results, "empty results.json"
        outs.append(out)
        stamp = home / "sem-inspect-bench" / "venv" / ".pyproject.sha256"
        assert stamp.exists()
        if i == 0:
            first_stamp = stamp.stat().st_mtime_ns
        else:
            assert stamp.stat().st_mtime_ns == first_stamp, "the venv's dependencies were re-installed"
    assert (home / "sem-inspect-bench" / "bundles" / tiny_bundle.name / "manifest.yaml").exists()
    assert not (home / "sem-inspect-bench" / "src" / "tests").exists()       # only the packaged source


# ---------------------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_references_only_existing_files_and_packages_the_edge_runtime():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim-bookworm")
    copied = []
    for word, rest in ins:
        if word == "COPY":
            parts = rest.split()
            assert not any(p.startswith("--from") for p in parts)
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
                copied.append(src.rstrip("/"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = subprocess.run([sys.executable, str(REPO / "deploy" / "package-files.py"), str(REPO / "pyproject.toml")],
                            capture_output=True, text=True, check=True).stdout.split()
    needed = set(listed) | {"pyproject.toml", project["project"]["readme"]}
    assert {"edge_runtime", "train", "convert", "benchmarks"} <= needed
    assert needed <= set(copied), f"pip install needs {sorted(needed - set(copied))}"
    assert "central" not in needed and "central" not in copied        # the central side never goes on a board
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert 'pip install ".[edge]"' in runs and "tensorflow" in runs      # installs edge only, checks no TF
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["edge-inspect"]
    assert "edge-inspect" in project["project"]["scripts"]
    volumes = json.loads(dict(ins)["VOLUME"])
    assert set(volumes) == {"/data/incoming", "/data/processed", "/data/quarantine", "/data/db"}
    # The default command is a valid edge-inspect invocation of the watch service on those volumes.
    from edge_runtime.cli import build_parser
    args = build_parser().parse_args(json.loads(dict(ins)["CMD"]))
    assert args.watch == "/data/incoming" and args.models == "/models"
    assert Path(args.processed).parent == Path(args.quarantine).parent == Path("/data")
    # BuildKit's per-Dockerfile ignore file lets every COPY source through.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded by Dockerfile.dockerignore"
