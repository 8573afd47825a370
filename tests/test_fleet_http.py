"""The service's HTTP API (GET /healthz /metrics /results, POST /inspect), its systemd notifications and the fleet
settings, against the running service."""
from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from edge_runtime.exits import WatchError
from edge_runtime.config.service_config import ConfigError
from edge_runtime.service.watch import WatchService
from tests.support.images import png_bytes
from tests.support.waiting import wait_until
from tests.support.watch import make_config, run_in_thread, start_service

TOKEN = "s3cret-token-value"


def request(url: str, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        con.request(method, path, body=body, headers=hdrs)
        resp = con.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        con.close()


@pytest.fixture
def running(tiny_bundle, folders):
    pytest.importorskip("prometheus_client", reason='prometheus-client is not installed (sem-inspect[fleet])')
    service = WatchService(make_config(tiny_bundle, folders, http="127.0.0.1:0", http_token=TOKEN,
                                       http_max_bytes=50_000, threads=1))
    thread, out = run_in_thread(service)
    yield service, folders
    service.stop()
    thread.join(30)
    assert out.get("rc") == 0


def test_every_endpoint_against_the_running_service(running):
    service, f = running
    url = service.http.url
    for i in range(3):
        (f["watch"] / f"img {i}.png").write_bytes(png_bytes(i))
    (f["watch"] / "broken.png").write_bytes(b"\x89PNG not really")
    wait_until(lambda: service.stats.total.inspected + service.stats.total.quarantined == 4,
               120, lambda: service.stats.total.inspected + service.stats.total.quarantined)

    status, _, body = request(url, "GET", "/healthz", token=None)       # no token needed for probes
    health = json.loads(body)
    assert status == 200 and health["ok"] and health["model_loaded"] and health["folder_writable"]
    assert health["backlog"] == 0 and health["last_image_at"] and health["bundle_id"]

    status, headers, body = request(url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    assert sum(v for (n, _), v in samples.items() if n == "sem_inspect_images_total") == 3
    assert samples[("sem_inspect_quarantined_total", ())] == 1
    assert samples[("sem_inspect_stage_latency_seconds_count", (("stage", "stage1"),))] == 3
    assert samples[("sem_inspect_backlog", ())] == 0
    assert samples[("sem_inspect_rss_bytes", ())] > 10e6

    status, _, body = request(url, "GET", "/results?since=0&limit=3")
    page = json.loads(body)
    assert status == 200 and [r["id"] for r in page["results"]] == [1, 2, 3] and page["next"] == 3
    status, _, body = request(url, "GET", f"/results?since={page['next']}")
    rest = json.loads(body)["results"]
    assert [r["id"] for r in rest] == [4] and rest[0]["board"] == service.cfg.board

    status, _, body = request(url, "POST", "/inspect", png_bytes(7), headers={"Content-Type": "image/png"})
    result = json.loads(body)
    assert status == 200 and result["label"] and 0 <= result["stage1_score"] <= 1 and result["bundle_id"]
    same = service.bundles.inspector.inspect(png_bytes(7))
    assert result["label"] == same.label and result["stage1_score"] == pytest.approx(same.stage1_score, abs=1e-5)


@pytest.mark.parametrize("method, path, body, token, status", [
    ("GET", "/metrics", None, None, 401),
    ("GET", "/results", None, "wrong", 401),
    ("POST", "/inspect", b"x", "wrong", 401),
    ("GET", "/results?since=-1", None, TOKEN, 400),
    ("GET", "/results?since=abc", None, TOKEN, 400),
    ("GET", "/results?limit=0", None, TOKEN, 400),
    ("GET", "/results?limit=1001", None, TOKEN, 400),
    ("GET", "/results?limit=1&limit=2", None, TOKEN, 400),
    ("GET", "/results?sinse=1", None, TOKEN, 400),
    ("POST", "/inspect", b"this is not an image", TOKEN, 400),
    ("POST", "/inspect", b"", TOKEN, 400),
    ("POST", "/inspect", b"\0" * 60_000, TOKEN, 413),
    ("GET", "/nowhere", None, TOKEN, 404),
    ("DELETE", "/results", None, TOKEN, 405),
])
def test_bad_requests_get_a_4xx_and_the_service_goes_on(running, method, path, body, token, status):
    service, f = running
    got, headers, raw = request(service.http.url, method, path, body, token=token)
    assert got == status, raw
    assert json.loads(raw)["error"]
    if status == 401:
        assert headers["WWW-Authenticate"] == "Bearer"
    # still serving, still inspecting
    assert request(service.http.url, "GET", "/healthz")[0] == 200
    (f["watch"] / "after.png").write_bytes(png_bytes(99))
    wait_until(lambda: service.stats.total.inspected == 1, 120, lambda: service.stats.total.inspected)


def test_missing_content_length_is_411(running):
    service, _ = running
    parts = urlsplit(service.http.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(f"POST /inspect HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    status = request(service.http.url, "GET", "/healthz")[0]
    assert status == 200


def test_fleet_settings_without_the_fleet_extra_name_the_install(tiny_bundle, folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "paho.mqtt.client", None)      # import fails as if not installed
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for name, value, package in (("mqtt", "127.0.0.1:1883", "paho-mqtt"),
                                 ("http", "127.0.0.1:0", "prometheus-client")):
        with pytest.raises(WatchError,
                           match=rf'{name} needs the {package} package: pip install "sem-inspect\[fleet\]"'):
            WatchService(make_config(tiny_bundle, folders, **{name: value}))


@pytest.mark.parametrize("values, message", [
    ({"mqtt": "broker"}, "mqtt: 'broker': expected HOST:PORT"),
    ({"http": "127.0.0.1:99999"}, "port must be 0..65535"),
    ({"mqtt": "b:1", "mqtt_username": "u"}, "go together"),
    ({"mqtt": "b:1", "mqtt_ca": "ca.pem"}, "mqtt_ca needs mqtt_tls"),
    ({"board": "a/b"}, "MQTT topic level"),
    ({"mqtt_prefix": "fab/#"}, "without wildcards"),
])
def test_fleet_settings_are_checked(tiny_bundle, folders, values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(tiny_bundle, folders, **values)


def test_secrets_are_never_logged(tiny_bundle, folders, caplog):
    pytest.importorskip("paho.mqtt.client")
    pytest.importorskip("prometheus_client")
    cfg = make_config(tiny_bundle, folders, mqtt="127.0.0.1:1", mqtt_username="board", mqtt_password="hunter2-pw",
                      http="127.0.0.1:0", http_token=TOKEN, log_level="DEBUG")
    assert "hunter2-pw" not in repr(cfg) and TOKEN not in repr(cfg)
    caplog.set_level(logging.DEBUG)
    service = WatchService(cfg)
    thread, out = run_in_thread(service)
    (folders["watch"] / "a.png").write_bytes(png_bytes(1))
    wait_until(lambda: service.stats.total.inspected == 1, 120, lambda: service.stats.total.inspected)
    request(service.http.url, "GET", "/metrics", token="guess")
    service.stop()
    thread.join(30)
    assert out["rc"] == 0
    text = caplog.text
    assert "mqtt" in text and "hunter2-pw" not in text and TOKEN not in text


# -- systemd notify --------------------------------------------------------------------------------------
def test_sd_notify_ready_watchdog_stopping(tiny_bundle, folders, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")      # ping every 0.2 s
    log = tmp_path / "service.log"
    proc = start_service(tiny_bundle, folders, log)
    got: list[tuple[float, str]] = []
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and sum(m == "WATCHDOG=1" for _, m in got) < 5:
            try:
                got.append((time.monotonic(), sock.recv(4096).decode()))
            except socket.timeout:
                assert proc.poll() is None, log.read_text()
        messages = [m for _, m in got]
        assert messages[0].startswith("READY=1\nSTATUS=watching "), messages
        pings = [t for t, m in got if m == "WATCHDOG=1"]
        assert len(pings) >= 5, messages
        time.sleep(1.0)             # idle a while: pings must keep coming, not only at the start
        sock.settimeout(0)
        try:
            while True:
                sock.recv(4096)     # drop what came during the pause
        except BlockingIOError:
            pass
        sock.settimeout(1.0)

        def next_message():
            try:
                return sock.recv(4096).decode()
            except socket.timeout:
                assert proc.poll() is None, log.read_text()
                return None
        wait_until(lambda: next_message() == "WATCHDOG=1", 120, lambda: log.read_text()[-3000:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        rest = []
        sock.settimeout(0.2)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
        assert "STOPPING=1" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_a_hung_loop_stops_the_watchdog_pings(tiny_bundle, folders, tmp_path, monkeypatch):
    """The ping comes from the main loop, so a hang in it (here: an inspection that never returns in time) is
    seen by systemd as missing pings."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    service = WatchService(make_config(tiny_bundle, folders, threads=1))
    real = service.recorder.inspector.inspect
    hanging, release = threading.Event(), threading.Event()

    def hang(*a, **k):
        hanging.set()
        release.wait(120)           # hangs until the test has seen no pings for a while
        return real(*a, **k)
    service.recorder.inspector.inspect = hang
    thread, out = run_in_thread(service)
    try:
        def recv_for(seconds):
            msgs, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    msgs.append(sock.recv(4096).decode())
                except socket.timeout:
                    pass
            return msgs
        wait_until(lambda: "WATCHDOG=1" in recv_for(0.5), 120)
        (folders["watch"] / "slow.png").write_bytes(png_bytes(3))
        wait_until(hanging.is_set, 120)         # the loop is now inside the inspection
        recv_for(0.5)                           # what was sent before it
        assert "WATCHDOG=1" not in recv_for(1.0)
        release.set()
        wait_until(lambda: "WATCHDOG=1" in recv_for(0.5), 120, "pings again once the loop runs")
    finally:
        release.set()
        service.stop()
        thread.join(30)
        sock.close()
    assert out["rc"] == 0


def test_a_long_backlog_keeps_pinging_the_watchdog(tiny_bundle, folders, tmp_path, monkeypatch):
    """Busy is not hung: while a backlog is worked through image after image, the pings go on."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")      # ping every 0.2 s
    for i in range(12):
        (folders["watch"] / f"b{i}.png").write_bytes(png_bytes(i))
    service = WatchService(make_config(tiny_bundle, folders, threads=1))
    real = service.recorder.inspector.inspect

    def slow(*a, **k):
        time.sleep(0.25)
        return real(*a, **k)
    service.recorder.inspector.inspect = slow
    thread, out = run_in_thread(service)
    done_at_ping = []               # how many images were inspected at each ping

    def backlog_done() -> bool:
        try:
            if sock.recv(4096) == b"WATCHDOG=1":
                done_at_ping.append(service.stats.total.inspected)
        except socket.timeout:
            pass
        return service.stats.total.inspected >= 12
    try:
        wait_until(backlog_done, 240, lambda: done_at_ping, step=0)
    finally:
        service.stop()
        thread.join(30)
        sock.close()
    assert out["rc"] == 0 and service.stats.total.inspected == 12
    during = [n for n in done_at_ping if 0 < n < 12]
    assert len(during) >= 5 and len(set(during)) >= 2, done_at_ping     # while the backlog goes on, all along it
