"""Attacks on the board's network surfaces and data paths, with real processes (issue 19's targets):
`python -m benchmarks.attack --models BUNDLE`.

    service    `edge-inspect --watch` with `http:` and a token, inside a cgroup that emulates the systemd unit
               (MemoryMax=1G, TasksMax=64) where this machine allows it (root and cgroup v1 or v2), else without
               (the report says which):
                 held    N connections each send POST /inspect with the token and all but the last byte of a
                         20 MB body, and hold it, while images are dropped into the folder and /healthz is probed
                         4 times a second: peak RSS, alive, every dropped image inspected, probes answered
                 slow    N slow connections (half trickle a request head a byte a second and reconnect when
                         closed, half send nothing) while /healthz is probed: probes answered, latency, threads
                 decode  K clients POST a 7000x7000 PNG at once (legal, under http_max_bytes): peak RSS and RSS
                         after, against the idle service
    collector  Mosquitto + `python -m central`; F payloads published with QoS 1: valid results,
               redelivered duplicates, conflicting duplicates and malformed ones of every kind in issue 19 (UTF-16
               JSON, surrogates encoded as UTF-8, a \\ud800 escape, integers beyond 64 bits, missing fields,
               wrong types, out-of-range values, an 8 MB payload, deep nesting, random bytes, bad status):
               the collector must stay up, store every valid result once, keep every rejected one as a dead
               letter and record every conflict
    export     `edge-inspect export-labels` over a result database with hostile reviewed labels, hostile file
               names and a reviewer named like a spreadsheet formula: every path written must stay inside --out
    board-http the watch service with `http:` and a token (no cgroup), each case "held" or "broke":
                 drip    N connections announce a 20 MB POST /inspect body, half drip a byte every
                         --drip-every seconds, half send none of it: how many are still open after
                         --drip-seconds (held: none)
                 origin  POST /inspect with the token, Host the board's own and Origin another port of its
                         address, or another host: 403 (held); its own origin: served (the control)
    broker     the checkout's shipped broker config and a real collector (benchmarks/attack_central.py)
    central    the collector on PostgreSQL and the read API (benchmarks/attack_central.py)

    python -m benchmarks.attack --models models/real-lite0 [--only service,collector,export] [--held 50]
        [--slow 200] [--fuzz 1000] [--repo DIR] [--out reports/attack.json]
    python -m benchmarks.attack --only board-http,broker,central [--drip 20] [--api-rows 300000]

--repo runs another checkout's code (e.g. `git archive main | tar -x -C /tmp/main`) for the figures before a
change. Only subprocesses and their files are used: nothing of edge_runtime is imported here.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.attack_central import run_broker, run_central
from benchmarks.attack_common import (MB, PREFIX, TOKEN, broker_conf, free_port, http, python_env, valid_result,
                                      wait_port)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# processes, cgroups, probes
# ---------------------------------------------------------------------------------------------------------
class Unit:
    """A cgroup with the unit's limits (MemoryMax=1G, TasksMax=64), v2 or v1; `ok` False where not allowed."""

    def __init__(self, memory: int = 1 << 30, tasks: int = 64):
        self.dirs: list[Path] = []
        self.kind = "none"
        name = f"sem-attack-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if v2.exists():
                d = Path("/sys/fs/cgroup") / name
                d.mkdir()
                self.dirs = [d]
                (d / "memory.max").write_text(str(memory))
                (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(tasks))
                self.kind = "cgroup v2"
            else:
                mine = {line.split(":")[1]: line.split(":")[2].strip()
                        for line in Path("/proc/self/cgroup").read_text().splitlines() if line.count(":") >= 2}
                mem = Path("/sys/fs/cgroup/memory") / mine.get("memory", "/").lstrip("/") / name
                pids = Path("/sys/fs/cgroup/pids") / mine.get("pids", "/").lstrip("/") / name
                mem.mkdir()
                self.dirs.append(mem)
                pids.mkdir()
                self.dirs.append(pids)
                (mem / "memory.limit_in_bytes").write_text(str(memory))
                (pids / "pids.max").write_text(str(tasks))
                self.kind = "cgroup v1"
        except OSError:
            self.close()
            self.kind = "none"

    @property
    def ok(self) -> bool:
        return self.kind != "none"

    def enter(self) -> None:        # preexec_fn: the child joins before it execs
        for d in self.dirs:
            (d / "cgroup.procs").write_text("0")

    def events(self) -> dict:
        out = {}
        for d in self.dirs:
            for name in ("memory.failcnt", "memory.events", "pids.events", "memory.max_usage_in_bytes"):
                if (d / name).exists():
                    out[name] = (d / name).read_text().strip().replace("\n", "; ")
        return out

    def close(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def proc_status(pid: int) -> dict:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")       # resets VmHWM to the current RSS
    except OSError:
        pass


class Prober(threading.Thread):
    """GET /healthz every `every` seconds (2 s timeout each) until stopped: answers, failures, latencies."""

    def __init__(self, port: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.port, self.every = port, every
        self.ok, self.failed, self.latency = 0, [], []
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            t = time.monotonic()
            try:
                status, _ = http(self.port, "GET", "/healthz", token=None, timeout=2.0)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"status {status}")
            except OSError as exc:
                self.failed.append(type(exc).__name__)
            self.latency.append(time.monotonic() - t)
            self.stop_event.wait(max(0.0, self.every - (time.monotonic() - t)))

    def report(self) -> dict:
        self.stop_event.set()
        self.join(5)
        lat = sorted(self.latency) or [0.0]
        return {"probes": self.ok + len(self.failed), "answered_200": self.ok, "failed": len(self.failed),
                "failures": sorted(set(self.failed)), "latency_ms_p50": round(lat[len(lat) // 2] * 1e3, 1),
                "latency_ms_max": round(lat[-1] * 1e3, 1)}


def png_bytes(seed: int, side: int = 64) -> bytes:
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def big_png() -> bytes:
    """A 7000x7000 8-bit SEM-like frame (a few hundred KB as PNG, 49 MB decoded)."""
    import numpy as np
    from PIL import Image
    side = 7000
    x = np.arange(side, dtype=np.float32)
    g = np.broadcast_to(((np.sin(x / 6.0) > 0) * 0.5 + 0.2).astype(np.float32), (side, side)).copy()
    g[side // 3: side // 3 + side // 50, :] = 0.95
    g[::7, ::5] += 0.1
    buf = io.BytesIO()
    Image.fromarray((np.clip(g, 0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------------------
class Service:
    def __init__(self, repo: Path, models: Path, work: Path, unit: Unit | None):
        self.port = free_port()
        self.watch = work / "incoming"
        self.watch.mkdir(parents=True)
        self.db = self.watch / ".edge-inspect.sqlite3"
        self.log = work / "service.log"
        cmd = [sys.executable, "-m", "edge_runtime.cli", "--models", str(models), "--watch", str(self.watch),
               "--http", f"127.0.0.1:{self.port}", "--http-token", TOKEN, "--threads", "2"]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=python_env(repo), cwd=repo,
                                         preexec_fn=unit.enter if unit and unit.ok else None)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if http(self.port, "GET", "/healthz", token=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        http(self.port, "POST", "/inspect", png_bytes(1))      # loads POST /inspect's interpreters: the baseline
        time.sleep(0.5)

    def inspected(self) -> int:
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            try:
                return con.execute("SELECT count(*) FROM results").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            return -1

    def status(self) -> dict:
        return proc_status(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def drop_images(folder: Path, n: int, every: float, start_seed: int) -> list[str]:
    names = []
    for i in range(n):
        name = f"drop-{start_seed + i:04d}.png"
        tmp = folder / (name + ".part")
        tmp.write_bytes(png_bytes(start_seed + i))
        os.rename(tmp, folder / name)
        names.append(name)
        time.sleep(every)
    return names


def attack_held(svc: Service, n: int, body_mb: int, hold: float, drops: int) -> dict:
    """n connections each send a POST /inspect head (valid token) and all but the last byte of the body."""
    length = body_mb * MB
    chunk = b"\0" * MB
    outcome: dict[str, int] = {}
    socks: list[socket.socket] = []
    lock = threading.Lock()

    def one():
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
        with lock:
            socks.append(s)
        head = (f"POST /inspect HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: image/png\r\nContent-Length: {length}\r\n\r\n").encode()
        try:
            s.sendall(head)
            left = length - 1
            while left > 0:
                sent = s.send(chunk[:min(left, len(chunk))])
                left -= sent
            what = "held (whole body but the last byte sent)"
        except OSError as exc:
            what = f"refused while sending ({type(exc).__name__})"
        try:
            s.settimeout(0.2)
            first = s.recv(64)
            if first:
                what = f"answered {first.split(b' ')[1].decode(errors='replace')} before the body was complete"
        except OSError:
            pass
        with lock:
            outcome[what] = outcome.get(what, 0) + 1

    reset_peak(svc.proc.pid)
    before = svc.inspected()
    idle = svc.status()
    prober = Prober(svc.port)
    prober.start()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    dropper = threading.Thread(target=drop_images, args=(svc.watch, drops, hold / max(drops, 1) / 2, 1000),
                               daemon=True)
    dropper.start()
    peak_threads = 0
    while time.monotonic() - t0 < hold:
        peak_threads = max(peak_threads, svc.status().get("Threads", 0))
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=max(1.0, hold))
    dropper.join(60)
    end = time.monotonic() + 60
    while svc.proc.poll() is None and svc.inspected() - before < drops and time.monotonic() < end:
        time.sleep(0.2)
    st = svc.status()
    result = {"connections": n, "body_mb": body_mb, "hold_s": hold, "outcomes": outcome,
              "service_alive": svc.proc.poll() is None, "exit": svc.proc.returncode,
              "rss_idle_mb": round(idle.get("VmRSS", 0), 1), "rss_peak_mb": round(st.get("VmHWM", 0), 1),
              "threads_peak": peak_threads, "dropped": drops,
              "dropped_inspected": max(0, svc.inspected() - before) if svc.proc.poll() is None else svc.inspected(),
              "healthz": prober.report()}
    for s in socks:
        s.close()
    return result


def attack_slow(svc: Service, n: int, seconds: float) -> dict:
    """n/2 connections trickle a request head (a byte a second, reconnecting when closed), n/2 send nothing."""
    stop = threading.Event()
    stats = {"connects": 0, "closed_by_server": 0, "connect_failed": 0}
    lock = threading.Lock()
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nX-Slow: {'a' * 4000}\r\n\r\n".encode()

    def trickle(silent: bool):
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
            except OSError:
                with lock:
                    stats["connect_failed"] += 1
                stop.wait(0.5)
                continue
            with lock:
                stats["connects"] += 1
            try:
                i = 0
                while not stop.is_set():
                    if not silent:
                        s.send(head[i % len(head): i % len(head) + 1])
                        i += 1
                    s.settimeout(1.0)
                    try:
                        if s.recv(4096) == b"":
                            raise ConnectionResetError
                    except socket.timeout:
                        pass
            except OSError:
                with lock:
                    stats["closed_by_server"] += 1
            finally:
                s.close()

    threads = [threading.Thread(target=trickle, args=(i % 2 == 1,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(2.0)             # all connections open before probing starts
    prober = Prober(svc.port)
    prober.start()
    t0, peak_threads = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        peak_threads = max(peak_threads, svc.status().get("Threads", 0))
        time.sleep(0.2)
    probes = prober.report()
    stop.set()
    for t in threads:
        t.join(5)
    return {"connections": n, "seconds": seconds, "service_alive": svc.proc.poll() is None,
            "threads_peak": peak_threads, "attacker": stats, "healthz": probes}


def attack_decode(svc: Service, clients: int, image: bytes) -> dict:
    reset_peak(svc.proc.pid)
    idle = svc.status().get("VmRSS", 0)
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def one():
        try:
            status = http(svc.port, "POST", "/inspect", image, timeout=300)[0]
        except OSError:
            status = -1
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(2.0)
    st = svc.status()
    return {"clients": clients, "image": "7000x7000 8-bit PNG", "bytes": len(image), "statuses": statuses,
            "wall_s": round(wall, 1), "rss_before_mb": round(idle, 1), "rss_peak_mb": round(st.get("VmHWM", 0), 1),
            "rss_after_mb": round(st.get("VmRSS", 0), 1), "service_alive": svc.proc.poll() is None}


def run_service(args, work: Path) -> dict:
    out: dict = {}
    unit = Unit() if not args.no_cgroup else None
    out["limits"] = f"{unit.kind}: MemoryMax=1G, TasksMax=64" if unit and unit.ok else \
        "none (no cgroup here): RSS measured, limits not enforced"
    try:
        svc = Service(args.repo, args.models, work / "held", unit)
        try:
            out["held"] = attack_held(svc, args.held, 20, args.hold, args.drops)
        finally:
            out["held"]["exit"] = svc.stop() if svc.proc.poll() is None else svc.proc.returncode
            out["held"]["cgroup"] = unit.events() if unit and unit.ok else {}
        svc = Service(args.repo, args.models, work / "slow", unit)
        try:
            out["slow"] = attack_slow(svc, args.slow, args.slow_seconds)
        finally:
            svc.stop()
        svc = Service(args.repo, args.models, work / "decode", unit)
        try:
            image = big_png()
            out["decode"] = [attack_decode(svc, k, image) for k in (8, 24)]
        finally:
            svc.stop()
    finally:
        if unit:
            unit.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# board-http: announced bodies that never come, requests from another origin
# ---------------------------------------------------------------------------------------------------------
def attack_drip(svc: Service, n: int, seconds: float, drip_every: float, body_mb: int = 20) -> dict:
    """n connections announce a body_mb POST /inspect body: half drip a byte every drip_every seconds, half send
    none of it. After `seconds`, how many the service still keeps open (neither answered nor closed)."""
    length = body_mb * MB
    head = (f"POST /inspect HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {length}\r\n\r\n").encode()
    conns = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
        s.sendall(head)
        s.setblocking(False)
        conns.append({"sock": s, "drips": i % 2 == 0, "ended_after_s": None, "answer": None})
    prober = Prober(svc.port)
    prober.start()
    t0 = time.monotonic()
    next_drip = t0 + drip_every
    while time.monotonic() - t0 < seconds:
        now = time.monotonic()
        for c in conns:
            if c["ended_after_s"] is not None:
                continue
            try:
                if c["drips"] and now >= next_drip:
                    c["sock"].send(b"\0")
                data = c["sock"].recv(256)
                if data and c["answer"] is None:
                    c["answer"] = data.split(b" ")[1].decode(errors="replace") if b" " in data else "?"
                if not data:
                    c["ended_after_s"] = round(now - t0, 1)
            except BlockingIOError:
                pass
            except OSError:
                c["ended_after_s"] = round(now - t0, 1)
        if now >= next_drip:
            next_drip += drip_every
        time.sleep(0.1)
    probes = prober.report()
    result: dict = {"connections": n, "body_mb": body_mb, "watched_s": seconds, "drip_every_s": drip_every}
    for kind, drips in (("dripping", True), ("silent", False)):
        mine = [c for c in conns if c["drips"] == drips]
        ended = sorted(c["ended_after_s"] for c in mine if c["ended_after_s"] is not None)
        answers: dict[str, int] = {}
        for c in mine:
            if c["answer"]:
                answers[c["answer"]] = answers.get(c["answer"], 0) + 1
        result[kind] = {"connections": len(mine), f"open_after_{seconds:g}s": len(mine) - len(ended),
                        "closed_after_s_max": ended[-1] if ended else None, "answers": answers}
    still_open = result["dripping"][f"open_after_{seconds:g}s"] + result["silent"][f"open_after_{seconds:g}s"]
    for c in conns:
        c["sock"].close()
    result.update({"still_open": still_open, "verdict": "held" if still_open == 0 else "broke",
                   "service_alive": svc.proc.poll() is None, "healthz": probes})
    return result


def origin_request(port: int, origin: str) -> int:
    """POST /inspect with the token, Host the board's own and this Origin: the status."""
    import http.client
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.request("POST", "/inspect", body=png_bytes(2), headers={
            "Host": f"127.0.0.1:{port}", "Origin": origin, "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "image/png"})
        resp = con.getresponse()
        resp.read()
        return resp.status
    finally:
        con.close()


def attack_origin(svc: Service) -> dict:
    """Another port of the board's own address and another host are other origins (403); the board's own
    origin is the control (served)."""
    origins = {"another port": f"http://127.0.0.1:{free_port()}", "another host": "http://evil.example",
               "its own (control)": f"http://127.0.0.1:{svc.port}"}
    expected = {"another port": 403, "another host": 403, "its own (control)": 200}
    statuses = {case: origin_request(svc.port, origin) for case, origin in origins.items()}
    return {"statuses": statuses, "verdict": "held" if statuses == expected else "broke", "expected": expected}


def run_board_http(args, work: Path, cases: tuple[str, ...] = ("drip", "origin")) -> dict:
    """The watch service with `http:` and a token (no cgroup): announced bodies that drip, other origins."""
    out: dict = {}
    svc = Service(args.repo, args.models, work / "board-http", None)
    try:
        if "origin" in cases:
            out["origin"] = attack_origin(svc)
        if "drip" in cases:
            out["drip"] = attack_drip(svc, args.drip, args.drip_seconds, args.drip_every)
    finally:
        out["exit"] = svc.stop()
    return out


# ---------------------------------------------------------------------------------------------------------
# the collector
# ---------------------------------------------------------------------------------------------------------


def malformed(rng: random.Random, board: str, rid: int) -> tuple[str, bytes, str]:
    """(topic, payload, kind) of a message the collector must reject."""
    good = valid_result(board, rid, rng)
    topic = f"{PREFIX}/{board}/result"
    kind = rng.choice(["utf16", "utf8-surrogate", "escaped-surrogate", "id-2**64", "id-negative", "id-text",
                       "id-float", "id-bool", "review-10**30", "missing-field", "wrong-type", "score-range",
                       "nan", "deep", "random-bytes", "empty", "array", "truncated", "board-mismatch",
                       "hostile-label", "bad-time", "bad-status", "big-int-digits"])
    text = json.dumps(good)
    if kind == "utf16":
        return topic, text.encode("utf-16"), kind
    if kind == "utf8-surrogate":
        return topic, text.replace('"int8"', '"in\udc80t8"').encode("utf-8", "surrogatepass"), kind
    if kind == "escaped-surrogate":
        return topic, text.replace('"int8"', '"\\ud800"').encode(), kind
    if kind.startswith("id-") or kind == "review-10**30":
        value = {"id-2**64": 2**64, "id-negative": -rid, "id-text": str(rid), "id-float": rid + 0.5,
                 "id-bool": True, "review-10**30": 10**30}[kind]
        return topic, json.dumps({**good, ("review" if kind.startswith("review") else "id"): value}).encode(), kind
    if kind == "missing-field":
        key = rng.choice(["id", "board", "name", "outcome", "recorded_at"])
        return topic, json.dumps({k: v for k, v in good.items() if k != key}).encode(), kind
    if kind == "wrong-type":
        wrong = {"name": [[1, 2], 12345, {"a": 1}, ""], "label": [12345, ["clean"], True],
                 "stage1_score": ["0.5", [0.5], None], "confidence": ["high", {"p": 1}], "sha256": [12345, "ab"],
                 "stage2_probs": ["bridges", [0.5, 0.5], {"bridges": "0.5"}], "recorded_at": [12345, "later"],
                 "review": ["no", 0, 1]}
        key = rng.choice(list(wrong))
        return topic, json.dumps({**good, "outcome": "inspected", "label": "clean", "review": False,
                                  "stage1_score": 0.1, "confidence": 0.9, key: rng.choice(wrong[key])}).encode(), kind
    if kind == "score-range":
        return topic, json.dumps({**good, "outcome": "inspected", "label": "clean", "review": False,
                                  "stage1_score": 7.5, "confidence": 0.9}).encode(), kind
    if kind == "nan":
        return topic, text.replace('"latency_ms": ', '"latency_ms": NaN, "x": ').encode(), kind
    if kind == "deep":
        return topic, (b"[" * 5000) + (b"]" * 5000), kind
    if kind == "random-bytes":
        return topic, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))), kind
    if kind == "empty":
        return topic, b"", kind
    if kind == "array":
        return topic, json.dumps([good]).encode(), kind
    if kind == "truncated":
        return topic, text[: rng.randint(1, len(text) - 1)].encode(), kind
    if kind == "board-mismatch":
        return topic, json.dumps({**good, "board": "board-zz"}).encode(), kind
    if kind == "hostile-label":
        return topic, json.dumps({**good, "outcome": "inspected", "review": False, "stage1_score": 0.1,
                                  "confidence": 0.9, "label": rng.choice(["../../x", "/etc", "A B", "=1+1"])}
                                 ).encode(), kind
    if kind == "bad-time":
        return topic, json.dumps({**good, "recorded_at": "yesterday"}).encode(), kind
    if kind == "big-int-digits":
        return topic, text.replace(f'"id": {rid}', '"id": ' + "9" * 5000).encode(), kind
    return f"{PREFIX}/{board}/status", rng.choice([b"\xff\xfe", b"maybe", b"online" * 10, b""]), "bad-status"


def fuzz_messages(n: int, seed: int = 19) -> dict:
    """n messages (and one 8 MB payload) for the collector: {"messages": [(topic, payload)], "valid":
    {(board, id): message}, "kinds": {kind: count}, "expected": the collector's table counts afterwards}."""
    rng = random.Random(seed)
    messages: list[tuple[str, bytes]] = []
    valid: dict[tuple[str, int], dict] = {}
    kinds: dict[str, int] = {}
    conflicts = set()
    rid = 0
    while len(messages) < n:
        board = rng.choice(["board-a", "board-b", "board-c"])
        rid += 1
        roll = rng.random()
        if roll < 0.40:
            msg, kind = valid_result(board, rid, rng), "valid"
            valid[(board, rid)] = msg
            messages.append((f"{PREFIX}/{board}/result", json.dumps(msg).encode()))
        elif roll < 0.50 and valid:
            key, kind = rng.choice(list(valid)), "duplicate (same content)"
            messages.append((f"{PREFIX}/{key[0]}/result", json.dumps(valid[key]).encode()))
        elif roll < 0.55 and valid:
            key, kind = rng.choice(list(valid)), "conflict (same id, other content)"
            payload = json.dumps({**valid[key], "name": f"impostor-{rid}.png"}).encode()
            conflicts.add((key, payload))
            messages.append((f"{PREFIX}/{key[0]}/result", payload))
        else:
            topic, payload, kind = malformed(rng, board, rid)
            messages.append((topic, payload))
        kinds[kind] = kinds.get(kind, 0) + 1
    big = valid_result("board-a", rid + 1, rng)
    # valid but for its size (other keys are allowed): only the payload bound refuses it
    messages.append((f"{PREFIX}/board-a/result", json.dumps({**big, "note": "x" * (8 * MB)}).encode()))
    kinds["8 MB payload"] = 1
    rejected = sum(k for kind, k in kinds.items() if not kind.startswith(("valid", "duplicate", "conflict")))
    return {"messages": messages, "valid": valid, "kinds": dict(sorted(kinds.items())),
            "expected": {"results": len(valid), "dead_letters": rejected, "conflicts": len(conflicts)}}


def run_collector(args, work: Path) -> dict:
    import paho.mqtt.client as mqtt
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    folder = work / "broker"
    folder.mkdir(parents=True)
    port = free_port()
    broker = subprocess.Popen([mosquitto, "-c", str(broker_conf(folder, port))], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(port)
    db = work / "central.sqlite3"
    log = work / "collect.log"
    cmd = [sys.executable, "-m", "central", "--broker", f"127.0.0.1:{port}", "--prefix", PREFIX,
           "--db", str(db)]

    def start_collector():
        with open(log, "ab") as fh:
            return subprocess.Popen(cmd, stdout=fh, stderr=fh, env=python_env(args.repo), cwd=args.repo)

    collector = start_collector()
    fuzz = fuzz_messages(args.fuzz)
    messages, valid = fuzz["messages"], fuzz["valid"]

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attack-publisher")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    end = time.monotonic() + 30
    while "collecting" not in log.read_text(errors="replace") and time.monotonic() < end:
        time.sleep(0.1)
    t0 = time.monotonic()
    for topic, payload in messages:
        pub.publish(topic, payload, qos=1).wait_for_publish(30)
    published = time.monotonic() - t0

    def counts():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
            try:
                out = {}
                for t in ("results", "dead_letters", "conflicts"):
                    try:
                        out[t] = con.execute(f"SELECT count(*) FROM fleet_{t}").fetchone()[0]
                    except sqlite3.OperationalError:
                        out[t] = None
                return out
            finally:
                con.close()
        except sqlite3.Error:
            return {}

    end = time.monotonic() + 60
    want = fuzz["expected"]
    while time.monotonic() < end and counts() != want:
        time.sleep(0.3)
    got = counts()
    alive = collector.poll() is None
    stored_ok = False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = {(b, i): json.loads(p) for b, i, p in con.execute("SELECT board, id, payload FROM fleet_results")}
        con.close()
        stored_ok = rows == valid
    except sqlite3.Error:
        pass
    if alive:
        collector.send_signal(signal.SIGTERM)
        first_exit = collector.wait(30)
    else:
        first_exit = collector.returncode
    # A restart: nothing is delivered again (everything was acknowledged), and it keeps running.
    collector = start_collector()
    time.sleep(3.0)
    after_restart = counts()
    restart_alive = collector.poll() is None
    if restart_alive:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    pub.loop_stop()
    broker.terminate()
    broker.wait(10)
    return {"payloads": len(messages), "kinds": fuzz["kinds"], "publish_s": round(published, 1),
            "expected": fuzz["expected"],
            "stored": got, "valid_results_stored_exactly": stored_ok, "collector_alive": alive,
            "collector_exit": first_exit, "after_restart": after_restart, "restart_alive": restart_alive}


# ---------------------------------------------------------------------------------------------------------
# export-labels
# ---------------------------------------------------------------------------------------------------------
# File names a drop folder may hold and labels a hostile user may write into the (group-writable) database.
HOSTILE_NAMES = ['=HYPERLINK("x").png', "-rf .png", "..png", "a\nb.png", "@SUM(1).png", "+1.png", "\tTAB.png",
                 "\u202egnp.exe", "back\\slash.png", "x" * 240 + ".png"]
HOSTILE_LABELS = ["../../escaped", "/tmp/sem-export-absolute", "..", "a/b", "clean\n", "", "X" * 40, "=cmd",
                  "../"]


def snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def run_export(args, work: Path) -> dict:
    sandbox = work / "sandbox"
    watch = sandbox / "site" / "incoming"
    watch.mkdir(parents=True)
    names = [f"ok-{i}.png" for i in range(4)] + HOSTILE_NAMES
    for i, name in enumerate(names):
        (watch / name).write_bytes(png_bytes(i))
    env = python_env(args.repo)
    run = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(args.models), "--watch",
                          str(watch), "--once", "--threads", "2"], env=env, cwd=args.repo, capture_output=True,
                         timeout=600)
    db = watch / ".edge-inspect.sqlite3"
    con = sqlite3.connect(db)
    ids = [r[0] for r in con.execute("SELECT id FROM results WHERE outcome = 'inspected' ORDER BY id")]
    labels = ["clean", "bridges"] + HOSTILE_LABELS
    # Reviews written straight into the (group-writable) database, as a hostile local user could.
    for k, rid in enumerate(ids):
        con.execute("INSERT INTO reviews (result_id, supersedes, old_label, new_label, reviewer, reviewed_at) "
                    "VALUES (?, 0, 'clean', ?, ?, '2026-12-02T00:00:00+00:00')",
                    (rid, labels[k % len(labels)], "=HYPERLINK(\"http://evil\",\"x\")" if k % 3 == 0 else "ann"))
    con.commit()
    con.close()
    watched = [Path("/tmp/sem-export-absolute"), sandbox.parent / "escaped", sandbox / "escaped"]
    existed = {p for p in watched if p.exists()}
    before = snapshot(sandbox)
    out = sandbox / "site" / "export"
    res = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "export-labels", "--db", str(db), "--out",
                          str(out), "--processed", str(watch / "processed")], env=env, cwd=args.repo,
                         capture_output=True, timeout=300)
    created = snapshot(sandbox) - before
    outside = sorted(p for p in created if not (p == str(out) or p.startswith(str(out) + os.sep)))
    # also anything written outside the sandbox through an absolute or climbing label
    escaped = [str(p) for p in watched if p.exists() and p not in existed]
    formulas = 0
    manifest = out / "export_manifest.csv"
    if manifest.exists():
        import csv
        with open(manifest, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                formulas += sum(1 for v in row.values() if v[:1] in ("=", "+", "-", "@", "\t", "\r"))
    return {"images": len(names), "inspected": len(ids), "service_exit": run.returncode,
            "export_exit": res.returncode, "files_created": len(created), "created_outside_out": outside[:20],
            "escaped_paths": escaped, "manifest_cells_starting_like_a_formula": formulas,
            "stderr_tail": res.stderr.decode(errors="replace")[-600:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attack", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=REPO / "models" / "real-lite0")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    p.add_argument("--only", default="service,collector,export")
    p.add_argument("--held", type=int, default=50)
    p.add_argument("--hold", type=float, default=15.0, help="seconds the bodies are held")
    p.add_argument("--drops", type=int, default=30, help="images dropped into the folder meanwhile")
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--slow-seconds", type=float, default=20.0)
    p.add_argument("--fuzz", type=int, default=1000)
    p.add_argument("--no-cgroup", action="store_true")
    p.add_argument("--drip", type=int, default=20, help="board-http: connections announcing a body that drips")
    p.add_argument("--drip-seconds", type=float, default=20.0, help="board-http: how long they are watched")
    p.add_argument("--drip-every", type=float, default=3.0, help="board-http: seconds between two dripped bytes")
    p.add_argument("--api-rows", type=int, default=300_000, help="central: result rows under the read API")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.models, args.repo = args.models.resolve(), args.repo.resolve()
    report = {"repo": str(args.repo), "machine": f"{os.cpu_count()} CPU, Python {sys.version.split()[0]}"}
    with tempfile.TemporaryDirectory(prefix="sem-attack-") as tmp:
        work = Path(tmp)
        groups = (("service", run_service), ("collector", run_collector), ("export", run_export),
                  ("board-http", run_board_http), ("broker", run_broker), ("central", run_central))
        for part, fn in groups:
            if part in args.only.split(","):
                t0 = time.monotonic()
                try:
                    report[part] = fn(args, work / part)
                except Exception as exc:        # one part failing must not hide the others' figures
                    report[part] = {"error": f"{type(exc).__name__}: {exc}"}
                report[part]["seconds"] = round(time.monotonic() - t0, 1)
                print(json.dumps({part: report[part]}, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
