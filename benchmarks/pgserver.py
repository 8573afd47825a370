"""A throwaway PostgreSQL server for the collector's tests and load benchmark: initdb in a temporary folder, one
server on 127.0.0.1:PORT (a free port) with its unix socket in that folder, trust authentication for the
`postgres` role, fsync left on (the benchmark measures real commits). The folder is removed by stop().

    with PostgresServer() as pg:
        url = pg.url                       # postgresql://postgres@127.0.0.1:PORT/postgres
        other = pg.create_database()       # a fresh, empty database on the same server: its URL
        pg.restart()                       # stop -m fast, start again (same port, same data)

Started as root, the server runs as the unprivileged `postgres` user (PostgreSQL refuses to run as root);
started as anyone else, as that user. unavailable_reason() says why it cannot start here (tests skip with it).
Nothing here imports the project or psycopg: the server is driven with PostgreSQL's own programs.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PG_USER = "postgres"          # the OS user the server runs as when started by root
ROLE = "postgres"             # the database superuser initdb creates (trust authentication: no password)
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """The server cannot be started here; the message says why."""


def pg_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs: initdb on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def unavailable_reason() -> str | None:
    """Why a throwaway server cannot start here (None: it can)."""
    bindir = pg_bindir()
    if bindir is None:
        return "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin; apt-get install postgresql)"
    for prog in ("initdb", "pg_ctl", "postgres", "psql"):
        if not os.access(bindir / prog, os.X_OK):
            return f"{bindir / prog} is missing or not executable"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no unprivileged user {PG_USER!r} to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, port: int | None = None):
        reason = unavailable_reason()
        if reason:
            raise PostgresUnavailable(reason)
        self.bindir = pg_bindir()
        self.port = port or free_port()
        self.root: Path | None = None
        self.running = False
        # as root: run the programs as the postgres user (subprocess drops privileges in the child)
        self._as = {"user": PG_USER, "group": pwd.getpwnam(PG_USER).pw_gid, "extra_groups": []} \
            if os.geteuid() == 0 else {}

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def _run(self, *argv: str, timeout: float = START_TIMEOUT_S) -> None:
        # output to a file, never to a pipe: a started server keeps its inherited descriptors open
        with open(self.root / "commands.log", "ab") as out:
            proc = subprocess.run([str(self.bindir / argv[0]), *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, cwd=self.root, timeout=timeout, **self._as)
        if proc.returncode != 0:
            action = argv[-1] if argv[0] == "pg_ctl" else ""            # pg_ctl ... start|stop
            raise PostgresUnavailable(f"{argv[0]} {action}".strip() + f" failed (exit {proc.returncode}): {self._tail()}")

    def _tail(self) -> str:
        lines = []
        for name in ("commands.log", "server.log"):
            path = self.root / name
            if path.is_file():
                lines += path.read_text(errors="replace").strip().splitlines()[-3:]
        return " | ".join(lines) or "no log"

    def start(self) -> str:
        """initdb (the first time) and start the server; returns its URL."""
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="pgserver-"))
            if self._as:
                os.chown(self.root, pwd.getpwnam(PG_USER).pw_uid, self._as["group"])
                os.chmod(self.root, 0o700)
            # --no-sync: a throwaway cluster need not be synced at creation; the server itself keeps fsync on
            self._run("initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--locale=C",
                      "--no-sync")
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                           f"unix_socket_directories = '{self.root}'\nfsync = on\nsynchronous_commit = on\n"
                           "max_connections = 200\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S), "start")
        self.running = True
        return self.url

    def stop(self, remove: bool = True) -> None:
        """Stop the server (fast: open transactions are rolled back) and, unless remove=False, delete its folder."""
        if self.root is None:
            return
        if self.running or (self.data / "postmaster.pid").exists():   # also a start that timed out
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def restart(self) -> None:
        """Stop (fast: clients are disconnected) and start again on the same port with the same data."""
        self.stop(remove=False)
        self.start()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql (as the superuser role, over TCP); returns its output."""
        proc = subprocess.run([str(self.bindir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                               "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-d", dbname, "-c", sql],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database on this server; returns its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def __enter__(self) -> "PostgresServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
