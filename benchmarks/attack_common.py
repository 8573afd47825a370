"""What the attack groups share (benchmarks/attack.py, benchmarks/attack_central.py): free ports, a plain HTTP
request, the environment that runs another checkout's code, a valid result message, a private Mosquitto."""
from __future__ import annotations

import getpass
import os
import random
import socket
import time
from pathlib import Path

TOKEN = "attack-token-123"
MB = 2**20
PREFIX = "sem-inspect"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
         timeout: float = 5.0) -> tuple[int, bytes]:
    import http.client
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        con.request(method, path, body=body, headers=headers)
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


def python_env(repo: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}


def valid_result(board: str, rid: int, rng: random.Random) -> dict:
    inspected = rng.random() < 0.85
    defect = rng.choice(["bridges", "cracks", "opens"]) if inspected and rng.random() < 0.5 else None
    score = round(rng.random(), 6)
    return {"id": rid, "path": f"/srv/sem/incoming/img{rid}.png", "name": f"img {rid}.png",
            "label": (defect or "clean") if inspected else None, "stage1_score": score if inspected else None,
            "defect_class": defect, "confidence": round(rng.random(), 6) if inspected else None,
            "review": (rng.random() < 0.2) if inspected else None, "latency_ms": round(rng.random() * 50, 3),
            "outcome": "inspected" if inspected else "quarantined", "reason": None if inspected else "corrupt",
            "moved_to": f"/srv/sem/processed/img{rid}.png", "sha256": "%064x" % rng.getrandbits(256),
            "variant": "int8", "bundle_id": "%064x" % rng.getrandbits(256),
            "stage2_probs": {"bridges": 0.5, "cracks": 0.3, "opens": 0.2} if defect else None,
            "recorded_at": "2026-12-02T10:00:00.000+00:00", "board": board}


def broker_conf(folder: Path, port: int, extra: str = "") -> Path:
    conf = folder / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {folder}/\nlog_dest file {folder}/broker.log\n" + extra)
    return conf


def wait_port(port: int, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")
