"""The central side under load: simulated boards publish real result messages at a steady rate through a private
Mosquitto into the collector (`python -m central`, 1 or 2 processes, --share with 2) on PostgreSQL
(a throwaway server, fsync on: benchmarks/pgserver.py) and on SQLite; the rate is stepped up to find what each
configuration sustains.

    python -m benchmarks.collector_load [--boards 200] [--rates 1000,2000,3000,4000] [--step-seconds 20]
        [--collectors 1,2] [--db both|postgres|sqlite] [--publishers 2] [--out reports/collector-load]

The broker has deploy/mosquitto-central.conf's settings that matter for throughput (persistence with autosave,
the queue limits, max_inflight_messages 20) on a plain loopback listener, without TLS, passwords or the ACL; so
one publisher process may publish for many boards' topics (one MQTT client per board would be 200 paho clients
on the same cores as the collector: a publisher process is one client, MQTT 3.1.1 like a board, QoS 1).

Messages: benchmarks.attack.valid_result (valid for the collector's schema.parse_result), per board ids 1, 2, 3 ...
continuing across steps, `recorded_at` the send time in UTC with milliseconds (as a board writes it). Each step
publishes at RATE results/s in total for --step-seconds, then waits up to --drain-seconds for every row.

Per step:
  achieved        results handed to the publishers' clients / step time, and acknowledged by the broker (PUBACK);
                  the publishers' lag (how far the slowest fell behind its schedule): if they cannot keep the
                  rate, the step measures them, not the collector (said in the verdict)
  backlog         published - committed rows, sampled every second; its slope over the last two thirds of the
                  step (results/s) says whether it grows
  sustained       publishers kept >= 97% of the rate, the backlog slope <= 3% of the rate, every row committed
                  within --drain-seconds after the step, and no collector exited
  delay (commit)  for a sample of boards (10%), the reader polls every 100 ms for rows it has not seen; a row seen
                  first by a poll that ended at T was committed before T and after the previous poll began: delay
                  = T - recorded_at, an upper bound, too high by at most one poll interval plus the query (~0.1 s)
  delay (insert)  for every row of the step: received_at - recorded_at (received_at is set by the collector just
                  before the batch's INSERT: it leaves out the insert and the commit, so it is a lower bound)
  CPU, RSS        per collector (user+sys / wall from /proc, peak VmRSS sampled every second), and the publishers,
                  the broker, the PostgreSQL server (postmaster and its children) and the whole machine: they all
                  share the machine's cores, the collector is not alone on it
After a configuration: exactly once checked on the database (rows == published, every board's ids exactly
1..N, no dead letters, no conflicts) and the collectors' own counts (stored, duplicates) from their stop line.

Writes OUT/results.json and OUT/results.md (a table per configuration, the machine and the date).
Not a test: numbers depend on the machine and on what else runs on it (load average recorded at start and end).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.attack import valid_result
from benchmarks.fleet_overhead import start_broker
from benchmarks.machine import describe_machine
from benchmarks.pgserver import PostgresServer, free_port, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
PREFIX = "sem-inspect"
GROUP = "load"
POLL_S = 0.1
SAMPLE_EVERY_S = 1.0
TICK = os.sysconf("SC_CLK_TCK")
# deploy/mosquitto-central.conf, what matters for throughput and loss (its TLS, passwords and ACL left out)
BROKER_CONF = """persistence true
persistence_location {folder}/
autosave_interval 60
persistent_client_expiration 30d
max_inflight_messages 20
max_queued_messages 5000000
max_queued_bytes 5000000000
retain_available true
"""


def utc_iso(t: float | None = None) -> str:
    """A board's recorded_at (edge_runtime.db.store.utc_now, which the benchmarks may not import): UTC, ms."""
    return _dt.datetime.fromtimestamp(time.time() if t is None else t, _dt.timezone.utc).isoformat(
        timespec="milliseconds")


def parse_time(text: str) -> float:
    return _dt.datetime.fromisoformat(text).timestamp()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- processes: the broker, CPU and memory from /proc

def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """pid and its direct children (the PostgreSQL postmaster and its backends)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# ---------------------------------------------------------------- the publishers (simulated boards)

def publisher(k: int, port: int, boards: list[str], first_ids: dict, rate: float, seconds: float, start_at: float,
              sent_value, report) -> None:
    """One process, one MQTT client, publishing for `boards` round-robin at `rate` results/s from `start_at`
    (wall clock) for `seconds`; reports next ids, sent, acknowledged, CPU and the largest lag behind schedule."""
    import paho.mqtt.client as mqtt

    rng = random.Random(k)
    pool = [valid_result("x", 1, rng) for _ in range(256)]      # realistic bodies; id, board, names set per message
    acked = [0]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"load-pub-{k}-{os.getpid()}",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(2000)          # a board's window is small; one client here speaks for many
    client.max_queued_messages_set(0)
    client.on_publish = lambda *a: acked.__setitem__(0, acked[0] + 1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    next_id = dict(first_ids)
    topics = {b: f"{PREFIX}/{b}/result" for b in boards}
    sent, lag, cpu0 = 0, 0, time.process_time()
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    while True:
        now = time.time()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate)
        if sent >= due:
            time.sleep(0.002)
            continue
        lag = max(lag, due - sent)
        stamp = utc_iso(now)
        for _ in range(min(due - sent, 200)):
            board = boards[sent % len(boards)]
            rid = next_id[board]
            next_id[board] = rid + 1
            m = dict(pool[rid % len(pool)])
            m.update(id=rid, board=board, name=f"img {rid}.png", path=f"/srv/sem/incoming/img{rid}.png",
                     moved_to=f"/srv/sem/processed/img{rid}.png", recorded_at=stamp)
            client.publish(topics[board], json.dumps(m).encode(), qos=1)
            sent += 1
        with sent_value.get_lock():
            sent_value.value = sent
    wall = time.time() - t0
    deadline = time.time() + 30
    while acked[0] < sent and time.time() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    client.disconnect()
    client.loop_stop()
    report.put({"k": k, "next_ids": next_id, "sent": sent, "acked": acked[0], "wall_s": wall, "cpu_s": cpu,
                "max_lag": lag})


# ---------------------------------------------------------------- reading the central database

class Reader:
    """Counts, the sample boards' new rows, and the delays recorded in the store, on either back-end."""

    def __init__(self, db: str):
        self.pg = db.startswith(("postgresql://", "postgres://"))
        self.db = db
        self.con = None

    def _connect(self):
        if self.con is None:
            if self.pg:
                import psycopg
                self.con = psycopg.connect(self.db, autocommit=True, connect_timeout=5)
            else:
                self.con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        return self.con

    def rows(self, sql: str, params=()) -> list[tuple]:
        if self.pg:
            sql = sql.replace("?", "%s")
        # read only after the collectors said "collecting": they created the tables first (an error is real)
        return [tuple(r) for r in self._connect().execute(sql, params).fetchall()]

    def count(self, table: str = "fleet_results") -> int:
        rows = self.rows(f"SELECT count(*) FROM {table}")
        return rows[0][0] if rows else 0

    def new_rows(self, boards: list[str], above: int) -> list[tuple]:
        marks = ", ".join("?" * len(boards))
        return self.rows(f"SELECT board, id, recorded_at FROM fleet_results WHERE board IN ({marks}) AND id > ?",
                         (*boards, above))

    def close(self):
        if self.con is not None:
            self.con.close()
            self.con = None


class CommitWatch:
    """Polls the sample boards every POLL_S; first sight of a row = an upper bound of its commit time."""

    def __init__(self, reader: Reader, boards: list[str]):
        self.reader, self.boards = reader, boards
        self.seen: dict[str, set] = {b: set() for b in boards}
        self.mark = {b: 0 for b in boards}          # every id <= mark seen
        self.delays: list[float] = []
        self.last = 0.0

    def poll(self) -> None:
        if time.monotonic() - self.last < POLL_S:
            return
        self.last = time.monotonic()
        rows = self.reader.new_rows(self.boards, min(self.mark.values()))
        seen_at = time.time()               # the poll ended: these rows were committed before now
        for board, rid, recorded_at in rows:
            if rid > self.mark[board] and rid not in self.seen[board]:
                self.seen[board].add(rid)
                self.delays.append(seen_at - parse_time(recorded_at))
        for board in self.boards:
            s = self.seen[board]
            while self.mark[board] + 1 in s:
                self.mark[board] += 1
                s.discard(self.mark[board])

    def take(self) -> list[float]:
        out, self.delays = self.delays, []
        return out


# ---------------------------------------------------------------- one configuration

class Collectors:
    def __init__(self, n: int, port: int, db: str, folder: Path):
        self.logs, self.procs = [], []
        for i in range(n):
            log = folder / f"collector-{i + 1}.log"
            share = ["--share", GROUP, "--client-id", f"collect-{i + 1}"] if n > 1 else []
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "central", "--broker", f"127.0.0.1:{port}", "--db", db, *share],
                cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all("collecting " in log.read_text(errors="replace") for log in self.logs):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.1)
        raise SystemExit("a collector did not start: " + " | ".join(log.read_text()[-500:] for log in self.logs))

    def exited(self) -> list[int]:
        return [p.returncode for p in self.procs if p.poll() is not None]

    def stop(self) -> list[dict]:
        out = []
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, log in zip(self.procs, self.logs):
            try:
                code = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait()
            text = log.read_text(errors="replace")
            found = re.findall(r"(\d+) result\(s\) stored, (\d+) duplicate\(s\), (\d+) conflict\(s\), (\d+) rejected",
                               text)
            counts = dict(zip(("stored", "duplicates", "conflicts", "rejected"), map(int, found[-1]))) if found \
                else None
            out.append({"exit": code, "counts": counts, "took_over": len(re.findall("took over", text))})
        return out


def backlog_slope(samples: list[tuple[float, int]], since: float) -> float:
    """Least-squares slope (results/s) of the backlog samples (t, backlog) taken at t >= since; 0 if too few."""
    tail = [(t, b) for t, b in samples if t >= since]
    if len(tail) < 2:
        return 0.0
    mt, mb = sum(t for t, _ in tail) / len(tail), sum(b for _, b in tail) / len(tail)
    den = sum((t - mt) ** 2 for t, _ in tail)
    return sum((t - mt) * (b - mb) for t, b in tail) / den if den else 0.0


def verdict(rate: float, achieved: float, slope: float, drained: float | None, drain_s: float,
            exits: list[int]) -> list[str]:
    """Why a step is not sustained (empty: it is). The publishers must keep 97% of the rate (else the step
    measured them); a backlog growing by more than 3% of the rate is the collectors falling behind."""
    reasons = []
    if achieved < 0.97 * rate:
        reasons.append(f"publishers reached only {achieved:.0f}/s")
    if slope > 0.03 * rate:
        reasons.append(f"backlog grows {slope:.0f}/s")
    if drained is None:
        reasons.append(f"not drained in {drain_s:g} s")
    if exits:
        reasons.append(f"collector exited {exits}")
    return reasons


def run_step(rate: float, seconds: float, drain_s: float, boards: list[str], next_ids: dict, nproc: int,
             port: int, reader: Reader, watch: CommitWatch, collectors: Collectors, broker_pid: int,
             pg_pid: int | None, published_before: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    shares = [boards[k::nproc] for k in range(nproc)]
    values = [ctx.Value("q", 0) for _ in range(nproc)]
    start_at = time.time() + 1.5                        # spawn and connect first; start together
    procs = [ctx.Process(target=publisher, args=(k, port, shares[k], {b: next_ids[b] for b in shares[k]},
                                                 rate / nproc, seconds, start_at, values[k], report))
             for k in range(nproc)]
    for p in procs:
        p.start()
    while time.time() < start_at:
        time.sleep(0.01)
    watched = {"collectors": [c.pid for c in collectors.procs], "publishers": [p.pid for p in procs],
               "broker": [broker_pid], "postgres": children(pg_pid) if pg_pid else []}
    cpu0 = {k: [cpu_seconds(pid) for pid in pids] for k, pids in watched.items()}
    busy0, t_busy0 = machine_busy()
    rss_peak = [0.0] * len(collectors.procs)
    samples = []                                     # (t since start, backlog)
    t0 = time.time()
    next_sample = t0
    first_iso = utc_iso(t0 - 0.001)
    while time.time() - t0 < seconds + 0.2:
        watch.poll()
        if time.time() >= next_sample:
            next_sample += SAMPLE_EVERY_S
            sent = sum(v.value for v in values)
            samples.append((time.time() - t0, published_before + sent - reader.count()))
            rss_peak = [max(r, rss_mb(p.pid)) for r, p in zip(rss_peak, collectors.procs)]
            if pg_pid:
                watched["postgres"] = sorted(set(watched["postgres"]) | set(children(pg_pid)))
        time.sleep(0.02)
    results = [report.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    publish_end = time.time()
    sent = sum(r["sent"] for r in results)
    acked = sum(r["acked"] for r in results)
    for r in results:
        next_ids.update(r["next_ids"])
    total = published_before + sent
    # drain: every row committed?
    drained = None
    while time.time() - publish_end < drain_s:
        watch.poll()
        if reader.count() >= total:
            drained = time.time() - publish_end
            break
        time.sleep(0.05)
    wall = time.time() - t0
    cpu = {k: [cpu_seconds(pid) - c for pid, c in zip(watched[k], cpu0[k])] for k in ("collectors", "broker")}
    pg_cpu = sum(cpu_seconds(pid) for pid in watched["postgres"]) - sum(cpu0["postgres"]) if pg_pid else None
    busy1, t_busy1 = machine_busy()
    pub_cpu = sum(r["cpu_s"] for r in results)          # measured in the publishers (they have exited)
    pub_wall = max(r["wall_s"] for r in results)
    slope = backlog_slope(samples, seconds / 3)
    last_iso = utc_iso(publish_end + 0.001)
    inserted = [parse_time(rec_) - parse_time(rec) for rec, rec_ in reader.rows(
        "SELECT recorded_at, received_at FROM fleet_results WHERE recorded_at >= ? AND recorded_at <= ?",
        (first_iso, last_iso))]
    commit = watch.take()
    achieved = sent / pub_wall
    exits = collectors.exited()
    reasons = verdict(rate, achieved, slope, drained, drain_s, exits)
    r3 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {
        "rate": rate, "seconds": seconds, "sent": sent, "acked": acked, "published_per_s": round(achieved, 1),
        "publisher_max_lag": max(r["max_lag"] for r in results),
        "backlog": [(round(t, 1), b) for t, b in samples], "backlog_slope_per_s": round(slope, 1),
        "drained_s": r3(drained), "sustained": not reasons, "why_not": "; ".join(reasons),
        "delay_commit_s": {"n": len(commit), "p50": r3(percentile(commit, 0.5)), "p99": r3(percentile(commit, 0.99)),
                           "max": r3(max(commit, default=None))},
        "delay_insert_s": {"n": len(inserted), "p50": r3(percentile(inserted, 0.5)),
                           "p99": r3(percentile(inserted, 0.99)), "max": r3(max(inserted, default=None))},
        "collector_cpu_pct": [round(100 * c / wall, 1) for c in cpu["collectors"]],
        "collector_rss_peak_mb": [round(r, 1) for r in rss_peak],
        "publishers_cpu_pct": round(100 * pub_cpu / pub_wall, 1),
        "broker_cpu_pct": round(100 * cpu["broker"][0] / wall, 1),
        "postgres_cpu_pct": None if pg_cpu is None else round(100 * pg_cpu / wall, 1),
        "machine_busy_pct": round(100 * (busy1 - busy0) / max(1, t_busy1 - t_busy0) * (os.cpu_count() or 1), 1),
        "wall_s": round(wall, 2),
    }


def exactly_once(reader: Reader, next_ids: dict, published: int) -> dict:
    rows = reader.count()
    per_board = {b: (n, lo, hi) for b, n, lo, hi in reader.rows(
        "SELECT board, count(*), min(id), max(id) FROM fleet_results GROUP BY board")}
    wrong = [b for b, nid in next_ids.items() if nid > 1 and per_board.get(b) != (nid - 1, 1, nid - 1)]
    extra = sorted(set(per_board) - set(next_ids))
    dead, conflicts = reader.count("fleet_dead_letters"), reader.count("fleet_conflicts")
    return {"rows": rows, "published": published, "boards_wrong": wrong[:10], "boards_unexpected": extra[:10],
            "dead_letters": dead, "conflicts": conflicts,
            "ok": rows == published and not wrong and not extra and dead == 0 and conflicts == 0}


def run_config(kind: str, n: int, args, pg: PostgresServer | None, folder: Path) -> dict:
    folder.mkdir(parents=True)
    broker, port = start_broker(folder / "broker", BROKER_CONF)
    db = pg.create_database() if kind == "postgresql" else str(folder / "central.sqlite3")
    collectors = Collectors(n, port, db, folder)
    reader = Reader(db)
    boards = [f"tool-{i:03d}" for i in range(args.boards)]
    next_ids = {b: 1 for b in boards}
    watch = CommitWatch(reader, boards[::max(1, round(1 / args.sample))])
    pg_pid = int((pg.data / "postmaster.pid").read_text().split()[0]) if kind == "postgresql" else None
    steps, published, stop_info = [], 0, []
    try:
        collectors.wait_ready()
        for rate in args.rates:
            step = run_step(rate, args.step_seconds, args.drain_seconds, boards, next_ids, args.publishers, port,
                            reader, watch, collectors, broker.pid, pg_pid, published)
            published += step["sent"]
            steps.append(step)
            print(f"{kind} x{n} {rate:>6.0f}/s: published {step['published_per_s']:.0f}/s, backlog slope "
                  f"{step['backlog_slope_per_s']:.0f}/s, drained {step['drained_s']} s, commit delay p50/p99 "
                  f"{step['delay_commit_s']['p50']}/{step['delay_commit_s']['p99']} s, collectors CPU "
                  f"{step['collector_cpu_pct']}%, {'sustained' if step['sustained'] else step['why_not']}",
                  flush=True)
            if not step["sustained"] and not args.all_steps:
                if step["drained_s"] is None:               # let it finish before counting
                    deadline = time.time() + 120
                    while reader.count() < published and time.time() < deadline:
                        time.sleep(0.5)
                break
        time.sleep(0.5)
        check = exactly_once(reader, next_ids, published)
    finally:
        stop_info = collectors.stop()
        reader.close()
        broker.terminate()
        broker.wait(30)
    ok_steps = [s["rate"] for s in steps if s["sustained"]]
    return {"db": kind, "collectors": n, "steps": steps, "sustained_rate": max(ok_steps, default=None),
            "exactly_once": check, "collector_stop": stop_info}


# ---------------------------------------------------------------- the report

def markdown(figures: dict) -> str:
    m = figures["machine"]
    lines = ["# Collector load: boards -> Mosquitto -> collector(s) -> database", "",
             f"{m['date']}, {m['hostname']}: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB, "
             f"{m['os']}, {m['python']}. Load average at start {m['load_average_at_start']}, at end "
             f"{figures['load_average_at_end']}.",
             f"{figures['boards']} boards, {figures['publishers']} publisher processes (one MQTT client each, "
             f"QoS 1), steps of {figures['step_seconds']:g} s, drain up to {figures['drain_seconds']:g} s. "
             "Commit delay: first sight by a 100 ms poll on a 10% sample of the boards, an upper bound (<= ~0.1 s "
             "high). Insert delay: received_at - recorded_at for every row, a lower bound (no insert, no commit). "
             "CPU % of one core; everything shares the machine's cores.", ""]
    for c in figures["configs"]:
        eo = c["exactly_once"]
        rate = "none" if c["sustained_rate"] is None else f"{c['sustained_rate']:g}"
        lines += [f"## {c['db']}, {c['collectors']} collector(s): sustained {rate} "
                  f"results/s", "",
                  "| rate/s | published/s | backlog slope/s | drained s | commit p50 / p99 s | insert p50 / p99 s "
                  "| collectors CPU % | collectors RSS MB | publishers CPU % | broker CPU % | postgres CPU % "
                  "| machine busy % | verdict |",
                  "|" + "---|" * 13]
        for s in c["steps"]:
            dc, di = s["delay_commit_s"], s["delay_insert_s"]
            lines.append(f"| {s['rate']:.0f} | {s['published_per_s']:.0f} | {s['backlog_slope_per_s']:.0f} "
                         f"| {s['drained_s']} | {dc['p50']} / {dc['p99']} | {di['p50']} / {di['p99']} "
                         f"| {' + '.join(map(str, s['collector_cpu_pct']))} "
                         f"| {' / '.join(map(str, s['collector_rss_peak_mb']))} | {s['publishers_cpu_pct']} "
                         f"| {s['broker_cpu_pct']} | {'-' if s['postgres_cpu_pct'] is None else s['postgres_cpu_pct']} "
                         f"| {s['machine_busy_pct']} | {'sustained' if s['sustained'] else s['why_not']} |")
        stops = "; ".join(f"exit {s['exit']}, {s['counts']}" for s in c["collector_stop"])
        lines += ["", f"Exactly once: {'yes' if eo['ok'] else 'NO'}: {eo['rows']} rows for {eo['published']} "
                      f"published, dead letters {eo['dead_letters']}, conflicts {eo['conflicts']}, boards with "
                      f"missing or extra ids {eo['boards_wrong'] or 'none'}. Collectors at stop: {stops}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.collector_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--boards", type=int, default=200)
    p.add_argument("--rates", default="1000,2000,3000,4000", help="results/s per step, comma-separated")
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument("--collectors", default="1,2", help="collector counts to run, comma-separated")
    p.add_argument("--db", choices=("both", "postgres", "sqlite"), default="both")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    p.add_argument("--sample", type=float, default=0.1, help="share of boards whose commit delay is polled")
    p.add_argument("--all-steps", action="store_true", help="go on after a step that is not sustained")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "collector-load")
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
        counts = [int(c) for c in args.collectors.split(",")]
    except ValueError:
        p.error("--rates and --collectors are comma-separated numbers")
    if args.boards < 1 or args.publishers < 1 or not 0 < args.sample <= 1 or min(args.rates) <= 0 or \
            min(counts) < 1:
        p.error("--boards, --publishers, --collectors and --rates must be positive, --sample in (0, 1]")
    kinds = {"both": ["postgresql", "sqlite"], "postgres": ["postgresql"], "sqlite": ["sqlite"]}[args.db]
    figures = {"machine": describe_machine(), "boards": args.boards, "publishers": args.publishers,
               "step_seconds": args.step_seconds, "drain_seconds": args.drain_seconds, "configs": [],
               "skipped": []}
    print(f"load average at start: {figures['machine']['load_average_at_start']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    pg = None
    with tempfile.TemporaryDirectory(prefix="collector-load-") as tmp:
        try:
            if "postgresql" in kinds:
                reason = unavailable_reason()
                if reason:
                    print(f"postgresql: skipped ({reason})")
                    figures["skipped"].append(f"postgresql: {reason}")
                    kinds.remove("postgresql")
                else:
                    pg = PostgresServer()
                    pg.start()
            for kind in kinds:
                for n in counts:
                    figures["configs"].append(run_config(kind, n, args, pg, Path(tmp) / f"{kind}-{n}"))
        finally:
            if pg is not None:
                pg.stop()
    figures["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "results.json").write_text(json.dumps(figures, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(figures))
    print(f"load average at end: {figures['load_average_at_end']}; wrote {args.out}/results.json and results.md")
    return 0 if all(c["exactly_once"]["ok"] for c in figures["configs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
