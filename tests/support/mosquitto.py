"""A private Mosquitto broker (Debian package `mosquitto`) on a free loopback port, and paho-mqtt."""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterable

import pytest

from tests.support.net import free_port
from tests.support.waiting import wait_until

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or next(
    (p for p in ("/usr/bin/mosquitto_passwd",) if Path(p).exists()), None)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)")
START_TIMEOUT_S = 60


def paho():
    """paho.mqtt.client, or skip (the importing test module, when called at its top) with how to install it."""
    return pytest.importorskip("paho.mqtt.client", reason='paho-mqtt is not installed (pip install "sem-inspect[fleet]")')


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file for these users (mosquitto_passwd), or skip where that program is missing."""
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto_passwd is not installed")
    for i, (user, password) in enumerate(users.items()):
        subprocess.run([MOSQUITTO_PASSWD, "-b", *(["-c"] if i == 0 else []), str(path), user, password],
                       check=True, timeout=30)
    return path


class Broker:
    """Mosquitto on 127.0.0.1:PORT with persistence on (sessions and queued QoS-1 messages survive a restart of
    the broker), its files in `folder`. passwords: {user: password} (anonymous clients are then refused);
    acl: an ACL file; extra: more configuration lines (TLS files, the shipped config's settings)."""

    def __init__(self, folder: Path, extra: Iterable[str] | str = (), passwords: dict[str, str] | None = None,
                 acl: Path | None = None):
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        # `user`: started as root, mosquitto would drop to user `mosquitto`, which cannot write this folder.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1",
                 f"allow_anonymous {'false' if passwords else 'true'}", "persistence true",
                 f"persistence_location {folder}/", f"log_dest file {self.log}"]
        if passwords:
            lines.append(f"password_file {password_file(folder / 'passwords', passwords)}")
        if acl:
            lines.append(f"acl_file {acl}")
        lines += extra.splitlines() if isinstance(extra, str) else list(extra)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None

    @property
    def log(self) -> Path:
        return self.folder / "broker.log"

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.skip(f"mosquitto could not start (exit {self.proc.returncode}); see {self.log}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_until(self._listening, START_TIMEOUT_S,
                       lambda: self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "no log")
        except AssertionError as exc:
            self.stop()
            pytest.skip(f"mosquitto did not listen: {exc}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()           # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ShippedCentralBroker:
    """Mosquitto with the shipped deploy/mosquitto-central.conf and deploy/mosquitto-acl.conf: its two listeners
    (8883 the boards', 8884 the central side's) on free loopback ports, TLS files left out, its two password files
    made from `boards` and `central` ({user: password}), its persistence in `folder`."""

    SHIPPED_PORTS = (8883, 8884)

    def __init__(self, folder: Path, boards: dict[str, str], central: dict[str, str]):
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        from tests.support.paths import REPO

        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.ports = folder, {}
        files = {"boards": password_file(folder / "boards.passwd", boards),
                 "central": password_file(folder / "central.passwd", central)}
        lines = [f"user {getpass.getuser()}", f"persistence_location {folder}/", f"log_dest file {self.log}"]
        for line in (REPO / "deploy" / "mosquitto-central.conf").read_text().splitlines():
            word = line.split()[0] if line.strip() and not line.startswith("#") else None
            if word is None or word in ("certfile", "keyfile", "cafile", "persistence_location", "log_dest"):
                continue
            if word == "listener":
                self.ports[int(line.split()[1])] = port = free_port()
                line = f"listener {port} 127.0.0.1"
            elif word == "password_file":
                line = f"password_file {files['boards' if 'boards' in line else 'central']}"
            elif word == "acl_file":
                line = f"acl_file {REPO / 'deploy' / 'mosquitto-acl.conf'}"
            lines.append(line)
        assert tuple(sorted(self.ports)) == self.SHIPPED_PORTS, \
            "the shipped config has a board listener (8883) and a central listener (8884)"
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None

    @property
    def log(self) -> Path:
        return self.folder / "broker.log"

    @property
    def boards_port(self) -> int:
        return self.ports[8883]

    @property
    def central_port(self) -> int:
        return self.ports[8884]

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"mosquitto exited {self.proc.returncode}: "
                        f"{self.log.read_text(errors='replace')[-2000:] if self.log.exists() else 'no log'}")
        for port in self.ports.values():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
        return True

    def start(self) -> "ShippedCentralBroker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._listening, START_TIMEOUT_S, "mosquitto listening on both ports")
        return self

    def restart_without_state(self) -> None:
        """Stopped, its persistence file removed (the broker lost its sessions), started on the same ports."""
        self.stop()
        (self.folder / "mosquitto.db").unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
