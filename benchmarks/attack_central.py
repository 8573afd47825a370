"""The attack groups on the central side (`python -m benchmarks.attack --only broker,central`), with real
processes, nothing of edge_runtime or central imported: the checkout in --repo is run as subprocesses.

    broker   Mosquitto with --repo's deploy/mosquitto-central.conf and deploy/mosquitto-acl.conf (TLS lines left
             out, ports and file paths replaced; a checkout with one listener has boards and collectors on it)
             and a real collector (`--client-id c1`, on the central listener):
               collector-id   board credentials connect with the collector's client id and a clean start while
                              the collector is stopped with results queued: how many are stored after it restarts
               board-id       board A connects with board B's client id: B still connected, never dropped
               presence       a board publishes retained `offline` presence under PREFIX/_collect/GROUP/MEMBER,
                              and a result under another board's name: both dropped by the broker
               central-port   board credentials on the central listener: refused
    central  the collector and the read API (`central`, or `edge_runtime.collect` in a checkout before the move):
               nul-status     a retained status whose text fields hold \\u0000, on a real PostgreSQL: the
                              collector still running after 2 restarts, the status stored
               busy-health    the read API over a SQLite database of --api-rows results: 100 clients asking
                              /counts?by=board,label while /healthz is probed 20 times: probes answered 200
               nul-filter     label=a%00b (and board=) on /counts and /results, over SQLite and PostgreSQL: 400,
                              never 503

Every case says "held" or "broke" with the figures it rests on.
"""
from __future__ import annotations

import getpass
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.attack_common import PREFIX, broker_conf, free_port, http, python_env, valid_result, wait_port
from benchmarks.pgserver import PostgresServer, unavailable_reason

BOARDS = {"tool-01": "pw-board-1", "tool-02": "pw-board-2"}
CENTRAL = {"collector": "pw-collector", "rollout": "pw-rollout"}
SHIPPED_PORTS = {"boards": 8883, "central": 8884}
WAIT_S = 30                # a state the attack waits for (a connection, a stored row)


def verdict(held: bool) -> str:
    return "held" if held else "broke"


def wait_for(predicate, seconds: float = WAIT_S, every: float = 0.1):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def central_module(repo: Path) -> str:
    """The collector's package in that checkout: `central`, or `edge_runtime.collect` before the move."""
    return "central" if (repo / "central" / "__main__.py").exists() else "edge_runtime.collect"


# ---------------------------------------------------------------------------------------------------------
# the shipped broker and MQTT clients
# ---------------------------------------------------------------------------------------------------------
def mosquitto_program(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
                                       None)
    if not found:
        raise RuntimeError(f"{name} is not installed (apt-get install mosquitto)")
    return found


def password_file(path: Path, users: dict[str, str]) -> Path:
    for i, (user, password) in enumerate(users.items()):
        subprocess.run([mosquitto_program("mosquitto_passwd"), "-b", *(["-c"] if i == 0 else []), str(path), user,
                        password], check=True, timeout=30, capture_output=True)
    return path


class ShippedBroker:
    """Mosquitto with the checkout's shipped central config: each listener on a free loopback port, TLS lines left
    out, its password files made from BOARDS and CENTRAL (one file of both where the config has one)."""

    def __init__(self, repo: Path, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.log, self.ports = folder, folder / "broker.log", {}
        files = {"boards": password_file(folder / "boards.passwd", BOARDS),
                 "central": password_file(folder / "central.passwd", CENTRAL),
                 "both": password_file(folder / "all.passwd", {**BOARDS, **CENTRAL})}
        lines = [f"user {getpass.getuser()}", f"persistence_location {folder}/", f"log_dest file {self.log}"]
        for line in (repo / "deploy" / "mosquitto-central.conf").read_text().splitlines():
            word = line.split()[0] if line.strip() and not line.startswith("#") else None
            if word is None or word in ("certfile", "keyfile", "cafile", "persistence_location", "log_dest"):
                continue
            if word == "listener":
                self.ports[int(line.split()[1])] = port = free_port()
                line = f"listener {port} 127.0.0.1"
            elif word == "password_file":
                which = "boards" if "boards" in line else "central" if "central" in line else "both"
                line = f"password_file {files[which]}"
            elif word == "acl_file":
                line = f"acl_file {repo / 'deploy' / 'mosquitto-acl.conf'}"
            lines.append(line)
        self.listeners = len(self.ports)
        self.boards_port = self.ports.get(SHIPPED_PORTS["boards"]) or next(iter(self.ports.values()))
        self.central_port = self.ports.get(SHIPPED_PORTS["central"], self.boards_port)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([mosquitto_program("mosquitto"), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in set(self.ports.values()):
            wait_port(port, WAIT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class Client:
    """A paho client (MQTT 3.1.1, as the boards) that counts its connections, refusals, drops and messages."""

    def __init__(self, port: int, client_id: str, user: str, password: str, clean: bool = True):
        import paho.mqtt.client as mqtt
        self.connects, self.disconnects, self.refused, self.messages = 0, 0, [], []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda cl, u, m: self._note(self.messages, (m.topic, bytes(m.payload)))
        self.suback = threading.Event()
        self.c.on_subscribe = lambda *a: self.suback.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _note(self, where: list, item) -> None:
        with self.lock:
            where.append(item)

    def _on_connect(self, client, userdata, flags, reason, props):
        if reason.is_failure:
            self._note(self.refused, str(reason))
        else:
            with self.lock:
                self.connects += 1

    def _on_disconnect(self, client, userdata, flags, reason, props):
        with self.lock:
            self.disconnects += 1

    def answered(self) -> bool:
        return bool(self.connects or self.refused)

    def subscribe(self, topic: str) -> bool:
        self.suback.clear()
        self.c.subscribe(topic, qos=1)
        return self.suback.wait(WAIT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Collector:
    """The checkout's collector as a process, its log in `log`; started() waits for its "collecting" line."""

    def __init__(self, repo: Path, port: int, db: str, log: Path, *extra: str):
        self.log, self.seen = log, log.read_text(errors="replace").count("collecting") if log.exists() else 0
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", central_module(repo), "--broker", f"127.0.0.1:{port}",
                                          "--prefix", PREFIX, "--db", db, *extra], stdout=fh, stderr=fh,
                                         env=python_env(repo), cwd=repo)

    def started(self) -> bool:
        wait_for(lambda: self.proc.poll() is not None or
                 self.log.read_text(errors="replace").count("collecting") > self.seen, 120)
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-400:]


def sqlite_rows(db: Path, sql: str) -> list:
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def board_result(board: str, rid: int) -> bytes:
    return json.dumps(valid_result(board, rid, random.Random(rid))).encode()


# ---------------------------------------------------------------------------------------------------------
# broker
# ---------------------------------------------------------------------------------------------------------
def case_collector_id(repo: Path, broker: ShippedBroker, work: Path, queued: int = 20) -> dict:
    db, log, pw = work / "central.sqlite3", work / "collect.log", work / "collector.pw"
    pw.write_text(CENTRAL["collector"])
    creds = ("--username", "collector", "--password-file", str(pw), "--client-id", "c1")
    first = Collector(repo, broker.central_port, str(db), log, *creds)
    if not first.started():
        return {"error": f"the collector did not start: {first.tail()}"}
    first.stop()                        # its persistent session keeps what comes meanwhile
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    wait_for(board.answered)
    for rid in range(1, queued + 1):
        board.publish(f"{PREFIX}/tool-01/result", board_result("tool-01", rid))
    thief = Client(broker.boards_port, "c1", "tool-01", BOARDS["tool-01"], clean=True)
    wait_for(thief.answered)
    thief_connected = thief.connects > 0
    thief.close()
    again = Collector(repo, broker.central_port, str(db), log, *creds)
    again.started()
    count = lambda: sqlite_rows(db, "SELECT count(*) FROM fleet_results")[0][0] \
        if sqlite_rows(db, "SELECT count(*) FROM fleet_results") else 0
    wait_for(lambda: count() >= queued, 20)
    stored = count()
    again.stop()
    board.close()
    return {"verdict": verdict(stored == queued), "queued": queued, "stored_after_restart": stored,
            "thief_connected": thief_connected}


def case_board_id(broker: ShippedBroker, watch_s: float = 3.0) -> dict:
    victim = Client(broker.boards_port, "tool-02", "tool-02", BOARDS["tool-02"])
    wait_for(victim.answered)
    attacker = Client(broker.boards_port, "tool-02", "tool-01", BOARDS["tool-01"])      # tool-02's client id
    wait_for(attacker.answered)
    time.sleep(watch_s)                 # a takeover shows within it: paho reconnects, the two drop each other
    result = {"verdict": verdict(victim.disconnects == 0 and victim.connects == 1),
              "victim_connects": victim.connects, "victim_dropped": victim.disconnects,
              "attacker_connected": attacker.connects > 0}
    for c in (victim, attacker):
        c.close()
    return result


def case_presence(broker: ShippedBroker) -> dict:
    board = Client(broker.boards_port, "tool-01", "tool-01", BOARDS["tool-01"])
    wait_for(board.answered)
    board.publish(f"{PREFIX}/_collect/central/c1", b"offline", retain=True)          # forged presence
    board.publish(f"{PREFIX}/tool-02/result", board_result("tool-02", 1))            # another board's result
    board.publish(f"{PREFIX}/tool-01/result", board_result("tool-01", 1))            # a marker after them
    watcher = Client(broker.central_port, "watcher", "collector", CENTRAL["collector"])
    wait_for(watcher.answered)
    watcher.subscribe(f"{PREFIX}/#")
    board.publish(f"{PREFIX}/tool-01/result", board_result("tool-01", 2))
    wait_for(lambda: any(t == f"{PREFIX}/tool-01/result" for t, _ in watcher.messages))
    presence = sum(1 for t, _ in watcher.messages if "/_collect/" in t)
    foreign = sum(1 for t, _ in watcher.messages if t == f"{PREFIX}/tool-02/result")
    for c in (board, watcher):
        c.close()
    return {"verdict": verdict(presence == 0 and foreign == 0), "forged_presence_retained": presence,
            "other_boards_result_delivered": foreign}


def case_central_port(broker: ShippedBroker) -> dict:
    outsider = Client(broker.central_port, "tool-01-central", "tool-01", BOARDS["tool-01"])
    wait_for(outsider.answered)
    result = {"verdict": verdict(bool(outsider.refused) and not outsider.connects),
              "listeners": broker.listeners, "refused": outsider.refused[:1], "connected": outsider.connects > 0}
    outsider.close()
    return result


BROKER_CASES = ("collector-id", "board-id", "presence", "central-port")


def run_broker(args, work: Path, cases: tuple[str, ...] = BROKER_CASES) -> dict:
    out: dict = {"config": f"{args.repo}/deploy/mosquitto-central.conf"}
    for name in cases:
        broker = ShippedBroker(args.repo, work / name / "broker")
        out["listeners"] = broker.listeners
        t0 = time.monotonic()
        try:
            if name == "collector-id":
                out[name] = case_collector_id(args.repo, broker, work / name)
            elif name == "board-id":
                out[name] = case_board_id(broker)
            elif name == "presence":
                out[name] = case_presence(broker)
            else:
                out[name] = case_central_port(broker)
        except Exception as exc:            # one case failing must not hide the others
            out[name] = {"verdict": "error", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            broker.stop()
        out[name]["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------------------
# central: collector and read API
# ---------------------------------------------------------------------------------------------------------
NUL_STATUS = {"status": "online", "bundle": {"current": "ab" * 32, "phase": "sha\u0000dow",
                                             "last_change": {"at": "2026-12-08T10:00:00\u0000", "what": "x\u0000",
                                                             "why": "because\u0000"}}}


def case_nul_status(args, work: Path, pg: PostgresServer, restarts: int = 2) -> dict:
    import paho.mqtt.client as mqtt
    folder = work / "broker"
    folder.mkdir(parents=True)
    port = free_port()
    broker = subprocess.Popen([mosquitto_program("mosquitto"), "-c", str(broker_conf(folder, port))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = pg.create_database()
    dbname = url.rsplit("/", 1)[1]
    runs = []
    try:
        wait_port(port)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tool-01")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish(f"{PREFIX}/tool-01/status", json.dumps(NUL_STATUS).encode(), qos=1,
                    retain=True).wait_for_publish(30)

        def count(sql: str) -> int:
            try:
                return int(pg.psql(sql, dbname).strip() or 0)
            except (RuntimeError, ValueError):
                return 0
        for run in range(restarts + 1):
            c = Collector(args.repo, port, url, work / "collect.log")
            started = c.started()
            pub.publish(f"{PREFIX}/tool-01/result", board_result("tool-01", run + 1), qos=1).wait_for_publish(30)
            stored = wait_for(lambda: count("SELECT count(*) FROM fleet_results") >= run + 1 or
                              c.proc.poll() is not None, 20) and c.proc.poll() is None
            time.sleep(1.0)             # a collector that fails on the status fails within it
            runs.append({"run": run, "started": started, "result_stored": bool(stored),
                         "running": c.proc.poll() is None, "exit": c.stop()})
        pub.loop_stop()
        status_rows = count("SELECT count(*) FROM fleet_bundle_state")
        last_exit = runs[-1]["exit"]
    finally:
        broker.terminate()
        broker.wait(10)
    held = all(r["running"] and r["result_stored"] for r in runs) and status_rows == 1
    return {"verdict": verdict(held), "runs": runs, "status_stored": status_rows == 1,
            "last_exit": last_exit, "log_tail": "" if held else (work / "collect.log").read_text(errors="replace")[-300:]}


def build_results_db(repo: Path, db: Path, rows: int, boards: int = 40) -> float:
    """A collector database made by the checkout's own storage (its schema), then `rows` results written with
    sqlite3 into its fleet_results (and the per-board totals where the schema has them): seconds taken."""
    t0 = time.monotonic()
    module = central_module(repo)
    subprocess.run([sys.executable, "-c", f"from {module}.storage import open_storage; open_storage({str(db)!r}).close()"],
                   env=python_env(repo), cwd=repo, check=True, timeout=120, capture_output=True)
    rng = random.Random(27)
    labels = ["clean", "bridges", "cracks", "opens", None]
    con = sqlite3.connect(db)
    columns = [r[1] for r in con.execute("PRAGMA table_info(fleet_results)")]

    def batch(start: int, n: int):
        for i in range(start, start + n):
            board = f"tool-{i % boards:02d}"
            label = rng.choice(labels)
            value = {"board": board, "id": i, "name": f"w{i}.png", "label": label,
                     "outcome": "inspected" if label else "quarantined", "stage1_score": rng.random(),
                     "defect_class": label if label not in ("clean", None) else None, "confidence": rng.random(),
                     "review": int(rng.random() < 0.1), "sha256": "ab" * 32, "bundle_id": "cd" * 32,
                     "recorded_at": f"2026-12-{1 + i % 7:02d}T{i % 24:02d}:00:00.000+00:00", "payload": "{}",
                     "received_at": "2026-12-08T00:00:00.000+00:00"}
            yield tuple(value.get(c) for c in columns)
    marks = ",".join("?" * len(columns))
    for start in range(0, rows, 50_000):
        con.executemany(f"INSERT INTO fleet_results ({','.join(columns)}) VALUES ({marks})",
                        batch(start, min(50_000, rows - start)))
        con.commit()
    if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'fleet_board_totals'").fetchone():
        con.execute("DELETE FROM fleet_board_totals")
        con.execute("INSERT INTO fleet_board_totals SELECT board, count(*), max(recorded_at) FROM fleet_results "
                    "GROUP BY board")
        con.commit()
    con.close()
    return time.monotonic() - t0


class Api:
    """The checkout's read API (`python -m MODULE.api --db DB --listen 127.0.0.1:PORT`), no token."""

    def __init__(self, repo: Path, db: str, log: Path):
        self.port, self.log = free_port(), log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", f"{central_module(repo)}.api", "--db", db, "--listen",
                                          f"127.0.0.1:{self.port}"], stdout=fh, stderr=fh, env=python_env(repo),
                                         cwd=repo)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the read API exited {self.proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-400:]}")
            try:
                return http(self.port, "GET", "/healthz", token=None, timeout=5)[0] == 200
            except OSError:
                return False
        if not wait_for(up, 60, every=0.2):
            raise RuntimeError("the read API did not answer /healthz")

    def get(self, path: str, timeout: float = 10.0) -> int:
        """The status, or -2 (timed out) / -1 (any other connection failure)."""
        try:
            return http(self.port, "GET", path, token=None, timeout=timeout)[0]
        except OSError as exc:
            return -1 if "timed out" not in str(exc) else -2

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def case_busy_health(api: Api, rows: int, clients: int = 100, probes: int = 20) -> dict:
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    done = threading.Event()

    def ask():
        while not done.is_set():
            status = api.get("/counts?by=board,label", timeout=30)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
    threads = [threading.Thread(target=ask, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)                     # the reports are queued before the first probe
    answers: dict[str, int] = {}
    latency = []
    for _ in range(probes):
        t0 = time.monotonic()
        status = str(api.get("/healthz", timeout=2.0))
        answers[status] = answers.get(status, 0) + 1
        latency.append(time.monotonic() - t0)
        time.sleep(max(0.0, 0.25 - (time.monotonic() - t0)))
    done.set()
    for t in threads:
        t.join(40)
    latency.sort()
    answered = answers.get("200", 0)
    return {"verdict": verdict(answered == probes), "rows": rows, "clients": clients, "probes": probes,
            "probes_answered_200": answered, "probe_answers": answers, "probe_ms_p50": round(latency[len(latency) // 2] * 1e3, 1),
            "probe_ms_max": round(latency[-1] * 1e3, 1),
            "counts_statuses": {str(k): v for k, v in sorted(statuses.items())}}


NUL_PATHS = ("/counts?label=a%00b", "/counts?by=board&board=tool%0001", "/results?label=%00")


def case_nul_filter(api: Api) -> dict:
    got = {path: api.get(path) for path in NUL_PATHS}
    return {"verdict": verdict(all(s == 400 for s in got.values())), "statuses": got}


def run_central(args, work: Path) -> dict:
    out: dict = {"module": central_module(args.repo)}
    work.mkdir(parents=True, exist_ok=True)
    reason = unavailable_reason()
    pg = None
    if reason:
        out["nul-status"] = {"verdict": "not run", "why": f"no PostgreSQL: {reason}"}
    else:
        pg = PostgresServer()
        pg.start()
    try:
        if pg:
            t0 = time.monotonic()
            try:
                out["nul-status"] = case_nul_status(args, work / "nul-status", pg)
            except Exception as exc:
                out["nul-status"] = {"verdict": "error", "error": f"{type(exc).__name__}: {exc}"}
            out["nul-status"]["seconds"] = round(time.monotonic() - t0, 1)
        db = work / "api.sqlite3"
        out["api_db_build_s"] = round(build_results_db(args.repo, db, args.api_rows), 1)
        api = Api(args.repo, str(db), work / "api.log")
        try:
            t0 = time.monotonic()
            out["busy-health"] = case_busy_health(api, args.api_rows)
            out["busy-health"]["seconds"] = round(time.monotonic() - t0, 1)
            out["nul-filter"] = {"sqlite": case_nul_filter(api)}
        finally:
            api.stop()
        if pg:
            url = pg.create_database()
            # the schema is made by the checkout's storage, as the collector would on its first start
            subprocess.run([sys.executable, "-c", f"from {central_module(args.repo)}.storage import open_storage; "
                            f"open_storage({url!r}).close()"], env=python_env(args.repo), cwd=args.repo,
                           check=True, timeout=120, capture_output=True)
            api = Api(args.repo, url, work / "api-pg.log")
            try:
                out["nul-filter"]["postgresql"] = case_nul_filter(api)
            finally:
                api.stop()
        cases = list(out["nul-filter"].values())
        out["nul-filter"]["verdict"] = verdict(all(c["verdict"] == "held" for c in cases))
    finally:
        if pg:
            pg.stop()
    return out
