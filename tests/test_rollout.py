"""Rolling a bundle out to a fleet, with real processes (issue 20): a real Mosquitto, a local HTTP server holding
the bundle archives, the central collector, and watch-service processes as boards receiving images.

    three boards: a good signed bundle is shadowed and promoted on all three; a wrongly signed one, a corrupted
    download and one whose shadow agreement falls below the bound are refused or kept in shadow (the boards stay
    on their bundle); a rollback returns them; every image is recorded once, and the central store shows the
    fleet's bundles
    kill -9 of a board during a download: the restarted board resumes it (HTTP Range) and promotes
    kill -9 of a board during swaps (SIGHUP, the models link re-pointed): nothing lost or recorded twice
"""
from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.collector import Collector
from tests.support.images import png_bytes
from tests.support.mosquitto import needs_mosquitto, paho
from tests.support.paths import REPO
from tests.support.waiting import wait_until

mqtt = paho()

pytest.importorskip("cryptography", reason='bundle signatures need cryptography (pip install "sem-inspect[signing]")')
pytestmark = needs_mosquitto
PREFIX = "sem-inspect"


# ---------------------------------------------------------------------------------------------------------
# the pieces: bundles, an HTTP server, boards, a status listener
# ---------------------------------------------------------------------------------------------------------
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with Range requests (resumed downloads), optionally throttled (server.rate bytes/s)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.server.requests.append((self.path, start))
        rate = self.server.rate
        step = 4096
        try:
            for k in range(start, len(data), step):
                self.wfile.write(data[k:k + step])
                if rate:
                    time.sleep(step / rate)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: RangeHandler(*a, directory=str(folder)))
    server.rate, server.requests = None, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"dir": folder, "url": f"http://127.0.0.1:{server.server_address[1]}", "server": server}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fleet_bundles(tmp_path_factory, tiny_bundle_v2):
    """A (current), B (the same models, another manifest: agrees everywhere), C (a Stage-1 threshold that flips
    most decisions: disagrees), W (signed with a key the boards do not trust), X (to be corrupted in transit);
    signed, packed into archives."""
    from convert.sign import main as sign_main
    from edge_runtime.adapt.derive import derive_bundle
    from edge_runtime.bundle import load_bundle
    from central.rollout import pack
    from edge_runtime.inspector import Inspector

    root = tmp_path_factory.mktemp("fleet")
    for who in ("trusted", "other"):
        assert sign_main(["keygen", "--out", str(root / who), "--name", "k"]) == 0
    a = load_bundle(tiny_bundle_v2)
    insp = Inspector(a, threads=1)
    defective = sum(insp.inspect(png_bytes(s)).defect_class is not None for s in range(40))
    flip = 0.0 if defective < 20 else 1.0        # C calls (nearly) everything the other way
    out = {}
    for name, kw in {"A": {}, "B": {"extra": {"source_run": "tests-b"}},
                     "C": {"gating": {"stage1_threshold": flip}, "extra": {"source_run": "tests-c"}},
                     "W": {"extra": {"source_run": "tests-w"}}, "X": {"extra": {"source_run": "tests-x"}}}.items():
        path = derive_bundle(a, root / name, **kw)
        key = root / ("other" if name == "W" else "trusted") / "k.key"
        assert sign_main(["sign", str(path), "--key", str(key)]) == 0
        archive, desc = pack(path, root / "archives")
        out[name] = {"path": path, "archive": archive, **desc}
    out["pub"] = root / "trusted" / "k.pub"
    return out


class Board:
    def __init__(self, root: Path, name: str, broker_port: int, bundle: Path, pub: Path, *extra: str):
        self.name, self.root = name, root
        self.incoming, self.processed, self.bundles = root / "incoming", root / "processed", root / "bundles"
        self.db, self.log = root / "results.sqlite3", root / "service.log"
        self.incoming.mkdir(parents=True)
        self.bundles.mkdir()
        shutil.copytree(bundle, self.bundles / "installed")
        os.symlink(self.bundles / "installed", self.bundles / "current")
        self.args = ["--models", str(self.bundles / "current"), "--watch", str(self.incoming),
                     "--processed", str(self.processed), "--db", str(self.db), "--threads", "1",
                     "--settle-seconds", "0.1", "--poll-seconds", "0.1", "--summary-seconds", "0",
                     "--mqtt", f"127.0.0.1:{broker_port}", "--mqtt-prefix", PREFIX, "--board", name,
                     "--mqtt-stats-seconds", "1", "--bundles-dir", str(self.bundles), "--trusted-keys", str(pub),
                     *extra]
        self.dropped: list[str] = []
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", *self.args], stdout=log,
                                         stderr=log, cwd=REPO, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def drop(self, n: int, seed: int) -> None:
        for i in range(n):
            name = f"{self.name}-{seed + i}.png"
            (self.incoming / f".{name}.part").write_bytes(png_bytes(seed + i))
            os.rename(self.incoming / f".{name}.part", self.incoming / name)
            self.dropped.append(name)

    def rows(self, sql: str = "SELECT * FROM results ORDER BY id") -> list[dict]:
        if not self.db.exists():
            return []
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql)]
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def recorded_all(self) -> bool:
        return len(self.rows()) >= len(self.dropped)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5) if self.proc else 0

    def check_exactly_once(self) -> list[dict]:
        rows = self.rows()
        assert sorted(r["name"] for r in rows) == sorted(self.dropped), self.text()[-3000:]
        assert len({r["key"] for r in rows}) == len(rows)
        assert all(r["state"] == "done" and r["outcome"] == "inspected" for r in rows)
        assert {p.name for p in self.processed.iterdir()} == set(self.dropped)
        return rows


class Statuses:
    """The latest status message of every board (retained, JSON)."""

    def __init__(self, port: int):
        self.latest: dict[str, dict] = {}
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-statuses")
        c.on_connect = lambda cl, *a: cl.subscribe(f"{PREFIX}/+/status", qos=1)
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.latest[msg.topic.split("/")[-2]] = json.loads(msg.payload)

    def bundle(self, board: str) -> dict:
        with self.lock:
            return (self.latest.get(board) or {}).get("bundle") or {}

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker_port: int, boards, *args) -> None:
    from central.rollout import main as rollout_main
    assert rollout_main([args[0], "--broker", f"127.0.0.1:{broker_port}", "--boards", ",".join(boards),
                         "--prefix", PREFIX, *args[1:]]) == 0


def change_is(statuses: Statuses, boards, what: str, rollout: str, current: str):
    def check():
        for b in boards:
            s = statuses.bundle(b)
            change = s.get("last_change") or {}
            if change.get("what") != what or change.get("rollout") != rollout or s.get("current") != current:
                return False
        return True
    return check


def collapsed(ids: list[str]) -> list[str]:
    out = []
    for i in ids:
        if not out or out[-1] != i:
            out.append(i)
    return out


# ---------------------------------------------------------------------------------------------------------
# three boards
# ---------------------------------------------------------------------------------------------------------
def test_three_boards_promote_refuse_reject_and_roll_back(tmp_path, broker, files, fleet_bundles, capsys):
    fb = fleet_bundles
    for k in "BCWX":
        shutil.copy(fb[k]["archive"], files["dir"])
    collector = Collector(broker.port, tmp_path / "central.sqlite3", tmp_path / "collect.log")
    statuses = Statuses(broker.port)
    names = ["board-1", "board-2", "board-3"]
    boards = [Board(tmp_path / n, n, broker.port, fb["A"]["path"], fb["pub"]) for n in names]
    a, b, c = fb["A"]["bundle_id"], fb["B"]["bundle_id"], fb["C"]["bundle_id"]
    try:
        for board in boards:
            board.start()
        for k, board in enumerate(boards):
            board.drop(4, 1000 * k)
        wait_until(lambda: all(bd.recorded_all() for bd in boards), 360, lambda: boards[0].text()[-3000:])
        shadow = ["--shadow-images", "6", "--shadow-minutes", "5", "--min-agreement", "0.9",
                  "--min-stage1-agreement", "0.9", "--max-error-rate", "0"]

        def roll(key: str, rid: str, outcome: str, current: str) -> None:
            publish(broker.port, names, "publish", "--archive", str(fb[key]["archive"]), "--url",
                    f"{files['url']}/{fb[key]['archive'].name}", "--id", rid, *shadow)
            if outcome == "shadow":
                wait_until(lambda: all(statuses.bundle(n).get("candidate") == current for n in names),
                           240, lambda: [statuses.bundle(n) for n in names])
            else:
                wait_until(change_is(statuses, names, outcome, rid, current),
                           240, lambda: [statuses.bundle(n) for n in names])

        # 1. a good signed bundle: fetched, verified, shadowed on 6 images, promoted on all three
        roll("B", "roll-b", "shadow", b)
        for k, board in enumerate(boards):
            board.drop(8, 1000 * k + 100)
        wait_until(change_is(statuses, names, "promoted", "roll-b", b),
                   360, lambda: [statuses.bundle(n) for n in names])
        # 2. wrongly signed, 3. corrupted in transit: refused at once, the boards stay on B
        roll("W", "roll-w", "refused", b)
        assert all("not among the 1 trusted key(s)" in statuses.bundle(n)["last_change"]["why"] for n in names)
        served = files["dir"] / fb["X"]["archive"].name
        data = bytearray(served.read_bytes())
        data[len(data) // 2] ^= 0xFF
        served.write_bytes(bytes(data))
        roll("X", "roll-x", "refused", b)
        assert all("sha256 mismatch" in statuses.bundle(n)["last_change"]["why"] and "rollout says" in
                   statuses.bundle(n)["last_change"]["why"] for n in names)      # the download's own check
        # 4. a bundle that disagrees: shadowed, then kept out
        roll("C", "roll-c", "shadow", c)
        for k, board in enumerate(boards):
            board.drop(8, 1000 * k + 200)
        wait_until(change_is(statuses, names, "rejected", "roll-c", b),
                   360, lambda: [statuses.bundle(n) for n in names])
        assert all("label agreement" in statuses.bundle(n)["last_change"]["why"] for n in names)
        # a hostile message on one board's topic: refused with the reason, nothing changes
        raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-hostile")
        raw.connect("127.0.0.1", broker.port)
        raw.loop_start()
        raw.publish(f"{PREFIX}/board-1/rollout", b'{"action": "rollout", "id": "evil", "url": "file:///etc/shadow"}',
                    qos=1).wait_for_publish(10)
        raw.loop_stop()
        wait_until(lambda: "rollout message refused: url must be" in
                   (statuses.bundle("board-1").get("last_change") or {}).get("why", ""),
                   120, lambda: (statuses.bundle("board-1").get("last_change") or {}).get("why", ""))
        assert statuses.bundle("board-1")["current"] == b
        # 5. rollback: back to A
        publish(broker.port, names, "rollback", "--id", "back-1")
        wait_until(change_is(statuses, names, "rolled back", "back-1", a), 240,
                   lambda: [statuses.bundle(n) for n in names])
        for k, board in enumerate(boards):
            board.drop(3, 1000 * k + 300)
        wait_until(lambda: all(bd.recorded_all() for bd in boards), 240,
                   lambda: [(bd.name, len(bd.rows()), len(bd.dropped)) for bd in boards])

        def fleet_state():          # what the collector stored of the boards' statuses
            return sorted(collector.rows("SELECT board, current, last_change FROM fleet_bundle_state"))
        wait_until(lambda: [(n, cur, (why or "")[:11]) for n, cur, why in fleet_state()] ==
                   [(n, a, "rolled back") for n in names], 120, fleet_state)
        for board in boards:
            assert board.stop() == 0, board.text()[-3000:]
    finally:
        for board in boards:
            if board.proc and board.proc.poll() is None:
                board.proc.kill()
        statuses.close()
        collector.stop()

    for board in boards:
        rows = board.check_exactly_once()
        # each result carries the bundle that made it: A, then B from the promotion on, then A after the rollback
        assert collapsed([r["bundle_id"] for r in rows]) == [a, b, a], board.name
        assert all(r["bundle_id"] == a for r in rows[-3:])
        shadows = board.rows("SELECT candidate_id, agree, stage1_agree FROM shadow_results")
        of_b = [s for s in shadows if s["candidate_id"] == b]
        of_c = [s for s in shadows if s["candidate_id"] == c]
        assert len(of_b) >= 6 and all(s["agree"] for s in of_b)
        assert len(of_c) >= 6 and sum(s["agree"] for s in of_c) / len(of_c) < 0.9
        kept = {p.name for p in board.bundles.iterdir() if not p.name.startswith(".")}
        assert b[:16] in kept and c[:16] not in kept and "current" in kept   # B kept for a rollback; C never installed
        text = board.text()
        assert "signed by" in text and "PRIVATE KEY" not in text
    state = {r["board"]: r for r in collector.rows("SELECT board, current, last_change FROM fleet_bundle_state")
             and [dict(zip(("board", "current", "last_change"), r))
                  for r in collector.rows("SELECT board, current, last_change FROM fleet_bundle_state")]}
    assert sorted(state) == names
    assert all(s["current"] == a and s["last_change"].startswith("rolled back") for s in state.values())
    from central.rollout import main as rollout_main
    assert rollout_main(["status", "--db", str(tmp_path / "central.sqlite3")]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}: current {a[:16]}" in out for n in names)


# ---------------------------------------------------------------------------------------------------------
# kill -9 during a download, during swaps
# ---------------------------------------------------------------------------------------------------------
def test_kill_9_during_a_download_resumes_and_loses_nothing(tmp_path, broker, files, fleet_bundles):
    fb = fleet_bundles
    shutil.copy(fb["B"]["archive"], files["dir"])
    files["server"].rate = 40_000              # ~3 s for the archive: time to kill the board half-way
    statuses = Statuses(broker.port)
    board = Board(tmp_path / "b1", "board-k", broker.port, fb["A"]["path"], fb["pub"])
    part = board.bundles / ".staging" / f"{fb['B']['sha256']}.tar.part"
    try:
        board.start()
        board.drop(3, 0)
        wait_until(board.recorded_all, 240, lambda: board.text()[-3000:])
        publish(broker.port, [board.name], "publish", "--archive", str(fb["B"]["archive"]), "--url",
                f"{files['url']}/{fb['B']['archive'].name}", "--id", "roll-k", "--shadow-images", "3",
                "--min-agreement", "0.9")
        wait_until(lambda: part.exists() and 10_000 < part.stat().st_size < fb["B"]["bytes"] // 2, 120, step=0.01)
        board.drop(3, 10)
        board.kill()
        assert not (board.bundles / fb["B"]["bundle_id"][:16]).exists()     # no half bundle where the service reads
        assert os.path.realpath(board.bundles / "current") == str(board.bundles / "installed")
        files["server"].rate = None
        board.start()
        board.drop(4, 20)
        wait_until(change_is(statuses, [board.name], "promoted", "roll-k", fb["B"]["bundle_id"]),
                   360, lambda: board.text()[-3000:])
        wait_until(board.recorded_all, 240, lambda: (len(board.rows()), len(board.dropped)))
        board.drop(2, 30)
        wait_until(board.recorded_all, 240, lambda: (len(board.rows()), len(board.dropped)))
        assert board.stop() == 0
    finally:
        if board.proc and board.proc.poll() is None:
            board.proc.kill()
        statuses.close()
    text = board.text()
    assert "resuming the download" in text and "resumed at" in text, text[-3000:]
    assert any(start > 0 for _, start in files["server"].requests)          # a Range request after the restart
    rows = board.check_exactly_once()
    assert rows[-1]["bundle_id"] == fb["B"]["bundle_id"]
    assert not part.exists()


def test_kill_9_during_swaps_loses_and_duplicates_nothing(tmp_path, fleet_bundles):
    """SIGHUP and the models link re-pointed while images stream in, with kill -9 at random moments around each
    swap: every image is recorded once, and each result carries a bundle that was current when it was made."""
    fb = fleet_bundles
    seed = int(time.time())
    rng = random.Random(seed)
    root = tmp_path / "board"
    for d in ("incoming", "models"):
        (root / d).mkdir(parents=True)
    for k in "AB":
        shutil.copytree(fb[k]["path"], root / "models" / k)
    link = root / "models" / "current"
    os.symlink(root / "models" / "A", link)
    args = ["--models", str(link), "--watch", str(root / "incoming"), "--processed", str(root / "processed"),
            "--db", str(root / "results.sqlite3"), "--threads", "1", "--settle-seconds", "0.05",
            "--poll-seconds", "0.05", "--summary-seconds", "0"]
    log = root / "service.log"
    dropped = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def start(*extra):
        with open(log, "ab") as fh:
            return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", *args, *extra], stdout=fh, stderr=fh,
                                    cwd=REPO, env=env)

    def drop(n, base):
        for i in range(n):
            name = f"s{base + i}.png"
            (root / "incoming" / name).write_bytes(png_bytes(base + i, size=rng.choice([40, 200])))
            dropped.append(name)

    def bundle_of(names):
        con = sqlite3.connect(root / "results.sqlite3")
        try:
            found = dict(con.execute(f"SELECT name, bundle_id FROM results WHERE name IN ({','.join('?' * len(names))})",
                                     names).fetchall())
        finally:
            con.close()
        return found

    swaps = 0
    for rnd in range(4):
        proc = start()
        try:
            wait_until(lambda: log.read_text(errors="replace").count("watching") > rnd,
                       240, lambda: log.read_text(errors="replace").count("watching"))
            drop(10, rnd * 100)
            time.sleep(rng.uniform(0.05, 0.3))
            target = "B" if os.path.realpath(link).endswith("/A") else "A"
            seen = log.read_text(errors="replace").count("now inspects every new image")
            os.symlink(root / "models" / target, root / "models" / ".next")
            os.replace(root / "models" / ".next", link)
            if rnd % 2 == 0:
                proc.send_signal(signal.SIGHUP)                  # at once; else the link is seen on a tick
            swaps += 1
            if rnd % 2:     # let this swap land, then: every later result carries the new bundle id
                wait_until(lambda: log.read_text(errors="replace").count("now inspects every new image") > seen,
                           120, lambda: log.read_text(errors="replace")[-3000:])
                later = [f"s{rnd * 100 + 50 + i}.png" for i in range(3)]
                drop(3, rnd * 100 + 50)
                wait_until(lambda: len(bundle_of(later)) == 3, 120, lambda: bundle_of(later))
                assert set(bundle_of(later).values()) == {fb[target]["bundle_id"]}, f"seed {seed}"
                drop(5, rnd * 100 + 60)
            time.sleep(rng.uniform(0.0, 0.25))               # kill -9 at a random moment (of the swap, or after)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    con = sqlite3.connect(root / "results.sqlite3")
    try:
        before = con.execute("SELECT count(*) FROM results").fetchone()[0]
    finally:
        con.close()
    drop(3, 1000)                                            # after the last swap: made by the linked bundle
    final = start("--once")
    assert final.wait(timeout=120) == 0, log.read_text(errors="replace")[-3000:]
    con = sqlite3.connect(root / "results.sqlite3")
    try:
        rows = con.execute("SELECT name, key, bundle_id, state FROM results ORDER BY id").fetchall()
    finally:
        con.close()
    assert sorted(r[0] for r in rows) == sorted(dropped), f"seed {seed}"
    assert len({r[1] for r in rows}) == len(rows) and all(r[3] == "done" for r in rows)
    assert {r[2] for r in rows} <= {fb["A"]["bundle_id"], fb["B"]["bundle_id"]}
    final_id = fb["A" if os.path.realpath(link).endswith("/A") else "B"]["bundle_id"]
    assert all(r[2] == final_id for r in rows[before:]), f"seed {seed}"     # made by the final run
    text = log.read_text(errors="replace")
    print(f"seed {seed}: {swaps} swaps, {text.count('now inspects every new image')} seen before a kill")


# ---------------------------------------------------------------------------------------------------------
# downgrades, fail-open, hostile file servers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released_bundles(tmp_path_factory, tiny_bundle_v2, fleet_bundles):
    """I (installed, release 500), N (release 2000), O (release 1000: older than N, signed by the same key)."""
    from convert.sign import main as sign_main
    from edge_runtime.adapt.derive import derive_bundle
    from edge_runtime.bundle import load_bundle
    from central.rollout import pack

    root = tmp_path_factory.mktemp("released")
    key = fleet_bundles["pub"].with_suffix(".key")
    a = load_bundle(tiny_bundle_v2)
    out = {}
    for name, release in (("I", 500), ("N", 2000), ("O", 1000)):
        path = derive_bundle(a, root / name, extra={"source_run": f"tests-release-{name}"})
        assert sign_main(["sign", str(path), "--key", str(key), "--release", str(release)]) == 0
        archive, desc = pack(path, root / "archives")
        out[name] = {"path": path, "archive": archive, **desc}
    return out


def test_an_older_signed_bundle_is_refused_and_only_a_rollback_goes_back(tmp_path, broker, files, released_bundles,
                                                                         fleet_bundles):
    rb = released_bundles
    for k in "NO":
        shutil.copy(rb[k]["archive"], files["dir"])
    statuses = Statuses(broker.port)
    board = Board(tmp_path / "b", "board-r", broker.port, rb["I"]["path"], fleet_bundles["pub"])
    i, n = rb["I"]["bundle_id"], rb["N"]["bundle_id"]

    def roll(key: str, rid: str) -> None:
        publish(broker.port, [board.name], "publish", "--archive", str(rb[key]["archive"]), "--url",
                f"{files['url']}/{rb[key]['archive'].name}", "--id", rid, "--shadow-images", "2",
                "--min-agreement", "0.5")

    try:
        board.start()
        board.drop(2, 0)
        wait_until(board.recorded_all, 240, lambda: board.text()[-3000:])
        roll("N", "roll-n")
        wait_until(lambda: statuses.bundle(board.name).get("candidate") == n, 240, lambda: board.text()[-3000:])
        board.drop(3, 10)
        wait_until(change_is(statuses, [board.name], "promoted", "roll-n", n), 360, lambda: board.text()[-3000:])
        roll("O", "roll-o")          # signed by the trusted key, but older than what the board runs: a replay
        wait_until(change_is(statuses, [board.name], "refused", "roll-o", n), 240, lambda: board.text()[-3000:])
        why = statuses.bundle(board.name)["last_change"]["why"]
        assert "release 1000 is older than release 2000" in why and "downgrade" in why
        publish(broker.port, [board.name], "rollback", "--id", "back-r")      # the operator's way back
        wait_until(change_is(statuses, [board.name], "rolled back", "back-r", i), 240, lambda: board.text()[-3000:])
        roll("O", "roll-o-2")        # still older than the highest release accepted
        wait_until(change_is(statuses, [board.name], "refused", "roll-o-2", i), 240, lambda: board.text()[-3000:])
        assert not any((board.bundles / ".staging").iterdir())
        assert board.stop() == 0
    finally:
        if board.proc and board.proc.poll() is None:
            board.proc.kill()
        statuses.close()
    board.check_exactly_once()


@pytest.mark.parametrize("case", ["drip", "oversize"])
def test_a_hostile_file_server_cannot_keep_a_rollout_fetching_or_fill_the_disk(tmp_path, broker, files,
                                                                               fleet_bundles, case):
    fb = fleet_bundles
    shutil.copy(fb["B"]["archive"], files["dir"])
    extra = ["--rollout-fetch-seconds", "2"] if case == "drip" else ["--rollout-max-bytes", "4096"]
    if case == "drip":
        files["server"].rate = 2000            # a 4 KiB block every 2 s: never done in time
    statuses = Statuses(broker.port)
    board = Board(tmp_path / "b", "board-h", broker.port, fb["A"]["path"], fb["pub"], *extra)
    try:
        board.start()
        for rid in ("h-1", "h-2", "h-3"):      # endless rollouts: each one refused, nothing left behind
            publish(broker.port, [board.name], "publish", "--archive", str(fb["B"]["archive"]), "--url",
                    f"{files['url']}/{fb['B']['archive'].name}", "--id", rid)
            wait_until(change_is(statuses, [board.name], "refused", rid, fb["A"]["bundle_id"]), 240,
                       lambda: board.text()[-3000:])
            why = statuses.bundle(board.name)["last_change"]["why"]
            assert ("not finished within 2 s" if case == "drip" else "more than 4096 bytes") in why, why
            staging = board.bundles / ".staging"
            wait_until(lambda: not staging.exists() or not any(staging.iterdir()), 120,
                       lambda: list(staging.iterdir()))
        assert board.stop() == 0
    finally:
        if board.proc and board.proc.poll() is None:
            board.proc.kill()
        statuses.close()


def test_taking_rollouts_without_trusted_keys_is_a_configuration_error(tmp_path, broker, fleet_bundles):
    board = Board(tmp_path / "b", "board-u", broker.port, fleet_bundles["A"]["path"], fleet_bundles["pub"])
    args = [a for k, a in enumerate(board.args) if a != "--trusted-keys" and board.args[k - 1] != "--trusted-keys"]
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args, "--once"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bundles_dir" in proc.stderr and "set trusted_keys" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# the command line: --db is text (a SQLite path or a postgresql:// URL)
# ---------------------------------------------------------------------------------------------------------
def test_status_reads_a_postgresql_url(postgres_server, capsys):
    """`status --db postgresql://...` reads the fleet from PostgreSQL (--db was once made a Path, which turned
    the URL into 'postgresql:/...' and refused it)."""
    from central.rollout import main as rollout_main
    from central.storage import open_storage
    from edge_runtime.fleet.messages import parse_bundle_state

    url = postgres_server.create_database()
    storage = open_storage(url)
    try:
        storage.set_bundle_state("sem-tool-07", parse_bundle_state(json.dumps(
            {"status": "online", "board": "sem-tool-07", "bundle": {"current": "ab" * 32}}).encode()))
    finally:
        storage.close()
    assert rollout_main(["status", "--db", url]) == 0
    assert f"sem-tool-07: current {'ab' * 8}" in capsys.readouterr().out


def test_status_on_a_closed_port_is_a_connection_error(capsys):
    pytest.importorskip("psycopg", reason='PostgreSQL needs psycopg (pip install "sem-inspect[central]")')
    from central.rollout import main as rollout_main

    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert rollout_main(["status", "--db", f"postgresql://nobody@127.0.0.1:{port}/fleet"]) == 2
    err = capsys.readouterr().err
    assert "made into a path" not in err and err.startswith("rollout status: error: PostgreSQL: connection") and \
        len(err.strip().splitlines()) == 1, err
