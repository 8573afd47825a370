"""edge_runtime/fleet/http_base.py, the serving model both HTTP servers share, over real sockets with short
limits: deadlines for slow heads and bodies, the connection cap, the worker queue, the body budget, and the
Host/Origin rule. (The attacks against the real services: test_http_hostile.py, test_review_hostile.py.)"""
from __future__ import annotations

import socket
import threading
import time
from http import HTTPStatus

import pytest

from edge_runtime.config.service_config import ConfigError
from edge_runtime.netnames import parse_host_names
from edge_runtime.fleet.http_base import AllowedHosts, BoundedHTTPServer, HTTPError, Limits, ResponseHandler


class Echo(ResponseHandler):
    server_version = "echo"
    fixed_headers = {"X-Test": "1"}

    def do_GET(self):
        def get():
            if self.path == "/slow":
                self.server.entered.set()
                self.server.release.wait(10)
            self._json(HTTPStatus.OK, {"path": self.path})
        self._dispatch(get)

    def do_POST(self):
        def post():
            body = self.request_body(1000)
            self._json(HTTPStatus.OK, {"length": len(body)})
        self._dispatch(post)


class EchoServer(BoundedHTTPServer):
    def __init__(self, limits: Limits, extra=()):
        self.entered, self.release = threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), Echo, AllowedHosts("127.0.0.1", extra), limits)

    def body_limit(self, method, path, headers):
        return 1000 if method == "POST" else 0


@pytest.fixture
def serve():
    servers = []

    def start(**limits):
        server = EchoServer(Limits(**{"head_seconds": 1.0, "idle_seconds": 1.0, **limits}))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1], server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def exchange(port: int, data: bytes, wait: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def get(port: int, path: str = "/", host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()


def test_a_head_or_body_slower_than_its_deadline_gets_408(serve):
    port, _ = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")        # never finished
        t = time.monotonic()
        reply = s.recv(200)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t > 0.9, reply     # not before its deadline
    reply = exchange(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\nabc")  # stalls
    assert reply.startswith(b"HTTP/1.1 408") and b"body too slow" in reply, reply


def test_keep_alive_pipelining_and_idle_close(serve):
    port, _ = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET /a HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\nPOST /b HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Content-Length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        got = b""
        while b'"/c"' not in got:
            got += s.recv(65536)
        assert got.index(b'"/a"') < got.index(b'"length": 3') < got.index(b'"/c"')
        assert s.recv(100) == b""       # the idle kept-alive connection is closed by the server (not timed out here)


def test_over_the_connection_cap_the_longest_waiting_goes_first(serve):
    port, _ = serve(max_connections=8, head_seconds=30)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.3)
        # a client that sends its request at once always gets in; the oldest silent ones were closed
        assert b"HTTP/1.1 200" in exchange(port, get(port))
        closed = 0
        for s in idle[:10]:
            s.settimeout(0.5)
            try:
                closed += s.recv(10) == b""
            except (socket.timeout, ConnectionResetError):
                closed += 0
        assert closed >= 8
    finally:
        for s in idle:
            s.close()


def test_full_worker_queue_and_body_budget_answer_503(serve):
    port, server = serve(workers=1, queue=1, body_budget=1500)
    blocked = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        blocked[0].sendall(get(port, "/slow"))          # the one worker waits
        assert server.entered.wait(60)
        blocked[1].sendall(get(port, "/queued"))        # fills the queue
        time.sleep(0.2)
        reply = exchange(port, get(port, "/over"))
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in reply and b"X-Test: 1" in reply
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        time.sleep(0.2)             # 1000 of the 1500 budget bytes are reserved for it
        reply = exchange(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900\r\n\r\n" + b"y" * 900)
        assert reply.startswith(b"HTTP/1.1 503") and b"request bodies in flight" in reply
        held.close()
    finally:
        server.release.set()
        for s in blocked:
            s.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 411),
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000, 413),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\n\r\n", 200),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505),
])
def test_malformed_requests_get_a_4xx(serve, request_bytes, status):
    port, _ = serve()
    reply = exchange(port, request_bytes)
    assert reply.startswith(f"HTTP/1.1 {status}".encode()), reply
    assert b"HTTP/1.1 200" in exchange(port, get(port))


def test_expect_100_continue(serve):
    port, _ = serve()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abcd")
        assert b'"length": 4' in s.recv(1000)


@pytest.mark.parametrize("bind, host, allowed", [
    ("127.0.0.1", "127.0.0.1:80", True), ("127.0.0.1", "LOCALHOST", True), ("127.0.0.1", "[::1]:8080", True),
    ("127.0.0.1", "localhost.evil.example", False), ("127.0.0.1", "10.0.0.5", False),
    ("127.0.0.1", "127.0.0.1:80:80", False), ("127.0.0.1", "", False), ("127.0.0.1", None, False),
    ("0.0.0.0", "10.0.0.5:8080", True), ("0.0.0.0", "[fe80::1]", True), ("0.0.0.0", "board.example", False),
    ("::", "localhost", True), ("10.1.2.3", "10.1.2.3:8080", True), ("10.1.2.3", "localhost", False),
    ("10.1.2.3", "sem-tool-07", True), ("10.1.2.3", "sem-tool-07.fab.local.", True),
])
def test_host_rule(bind, host, allowed):
    assert AllowedHosts(bind, parse_host_names("sem-tool-07, SEM-TOOL-07.fab.local")).allows(host) is allowed


@pytest.mark.parametrize("origin, allowed", [
    ("http://127.0.0.1:8081", True), ("https://localhost", True), ("http://evil.example", False),
    ("null", False), ("file://", False), ("http://127.0.0.1:8081/path", False), ("ftp://127.0.0.1", False),
])
def test_origin_rule(origin, allowed):
    assert AllowedHosts("127.0.0.1").allows_origin(origin) is allowed


@pytest.mark.parametrize("value", ["a b", "evil/x", "x" * 300, "http://x", "-bad-.example", "1.2.3.4:80"])
def test_allowed_host_names_are_checked(value, tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="is not a host name"):
        parse_host_names(value)
    from tests.support.watch import make_config
    folders = {"watch": tmp_path, "processed": tmp_path / "p", "quarantine": tmp_path / "q",
               "db": tmp_path / "db.sqlite3", "jsonl": tmp_path / "j.jsonl"}
    with pytest.raises(ConfigError, match="http_allowed_hosts"):
        make_config(tiny_bundle, folders, http="127.0.0.1:0", http_allowed_hosts=value)


def test_http_error_carries_extra_fields():
    exc = HTTPError(409, "stale", current={"id": 3})
    assert exc.status == 409 and exc.extra == {"current": {"id": 3}} and str(exc) == "stale"
