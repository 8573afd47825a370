"""The watch service: its configuration for a test's folders, what it records (the result database, the JSONL
journal, the folders), and the service as a thread or as a real process."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from edge_runtime.config.service_config import load_service_config
from tests.support.paths import REPO


def make_config(bundle, folders, **overrides):
    """The service's configuration over the `folders` fixture's folders, with short settle and poll times."""
    values = {"models": str(bundle), "watch": str(folders["watch"]), "processed": str(folders["processed"]),
              "quarantine": str(folders["quarantine"]), "db": str(folders["db"]), "jsonl": str(folders["jsonl"]),
              "settle_seconds": 0.2, "poll_seconds": 0.1, "summary_seconds": 0,
              "incomplete_seconds": 0.5}    # corrupt files written in place: quarantined after 0.5 s alone
    values.update(overrides)
    return load_service_config(None, values)


def rows(db: Path) -> list[dict]:
    """The result database's rows, in id order."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM results ORDER BY id")]
    finally:
        con.close()


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.exists() else set()


def run_in_thread(service):
    """service.run() in a daemon thread: (the thread, {"rc": its exit code once it returned})."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("rc", service.run()), daemon=True)
    t.start()
    return t, out


def start_service(bundle, folders, log_path: Path, *extra) -> subprocess.Popen:
    """`edge-inspect --watch` over the `folders` as a real process, its output appended to log_path."""
    cmd = [sys.executable, "-m", "edge_runtime.cli", "--models", str(bundle), "--watch", str(folders["watch"]),
           "--processed", str(folders["processed"]), "--quarantine", str(folders["quarantine"]),
           "--db", str(folders["db"]), "--jsonl", str(folders["jsonl"]), "--settle-seconds", "0.1",
           "--incomplete-seconds", "1", "--threads", "1", *extra]   # truncated files: quarantined after 1 s alone
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO, env=env)
