"""edge_runtime/fleet/http_base.py, the serving model every HTTP server shares, over real sockets with short
limits: deadlines for slow heads and bodies, the connection cap, the worker queue, the body budget, the
Host/Origin rule, and the route table (404, 405 with Allow, the token, the body rule, HEAD). (The attacks
against the real services: test_http_hostile.py, test_review_hostile.py.)"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http import HTTPStatus

import pytest

from edge_runtime.config.service_config import ConfigError
from edge_runtime.netnames import parse_host_names
from edge_runtime.fleet.http_base import (AllowedHosts, BoundedHTTPServer, HTTPError, Limits, ResponseHandler,
                                         authorized, route)


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


def servers_of(server_class, **defaults):
    """A fixture body: start(**limits) serves a server_class(Limits(defaults + limits)) on a thread and returns
    (its port, the server); every server started is released, stopped and closed after the test."""
    servers = []

    def start(**limits):
        server = server_class(Limits(**{**defaults, **limits}))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1], server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve():
    yield from servers_of(EchoServer, head_seconds=1.0, idle_seconds=1.0)


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


@pytest.mark.parametrize("origin, host, allowed", [
    ("http://127.0.0.1:8081", "127.0.0.1:8081", True), ("https://localhost", "localhost", True),
    ("http://[::1]:8081", "[::1]:8081", True), ("http://localhost:80", "localhost", True),
    ("http://evil.example", "127.0.0.1:8081", False), ("null", "127.0.0.1:8081", False),
    ("file://", "127.0.0.1:8081", False), ("http://127.0.0.1:8081/path", "127.0.0.1:8081", False),
    ("ftp://127.0.0.1", "127.0.0.1", False),
    ("http://127.0.0.1:9999", "127.0.0.1:8081", False),       # another port of the same address: another origin
    ("http://127.0.0.1", "127.0.0.1:8081", False), ("https://127.0.0.1", "127.0.0.1:8081", False),
    ("http://localhost:8081", "127.0.0.1:8081", False),       # another name of the same server: another origin
    ("http://127.0.0.1:8081", None, False), ("http://127.0.0.1:99999", "127.0.0.1:8081", False),
])
def test_origin_rule(origin, host, allowed):
    assert AllowedHosts("127.0.0.1").allows_origin(origin, host) is allowed


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


# ---------------------------------------------------------------------------------------------------------
# the route table
# ---------------------------------------------------------------------------------------------------------
TOKEN = "t0ken-value"


class Routed(ResponseHandler):
    """Two paths: /open for anyone, /items/{item_id} (GET, HEAD; POST with a body) with the token."""
    server_version = "routed"

    @route("GET", "/open", token=False)
    def _open(self):
        self.server.handled.append(("open", None))
        self._json(HTTPStatus.OK, {"open": True})

    @route(("GET", "HEAD"), "/items/{item_id}")
    def _item(self, item_id: str):
        self.server.handled.append(("item", item_id))
        self._json(HTTPStatus.OK, {"item": item_id, "query": self.query})

    @route("POST", "/items/{item_id}", body=True, heavy=True)
    def _post(self, item_id: str, body: bytes):
        self.server.handled.append(("post", body))
        self._json(HTTPStatus.OK, {"item": item_id, "length": len(body)})


class RoutedServer(BoundedHTTPServer):
    token, max_body, max_body_setting = TOKEN, 100, "the test's max_body"

    def __init__(self):
        self.handled = []
        super().__init__(("127.0.0.1", 0), Routed, AllowedHosts("127.0.0.1"),
                         Limits(head_seconds=5.0, idle_seconds=5.0))


@pytest.fixture
def routed():
    server = RoutedServer()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def call(server, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN):
    con = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        con.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = con.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    finally:
        con.close()


def test_routes_answer_with_their_path_parameters_and_query(routed):
    assert routed.url == f"http://127.0.0.1:{routed.server_address[1]}"
    status, _, doc = call(routed, "GET", "/items/42?x=1&x=2&y=")
    assert status == 200 and doc == {"item": "42", "query": {"x": ["1", "2"], "y": [""]}}
    status, headers, doc = call(routed, "HEAD", "/items/42")         # GET's headers, no body
    assert status == 200 and doc is None and int(headers["Content-Length"]) > 10
    assert call(routed, "GET", "/items/a%20b")[2]["item"] == "a b"   # the path is percent-decoded ...
    status, _, doc = call(routed, "GET", "/items/a%2Fb")             # ... before it is matched
    assert status == 404 and "/items/a/b" in doc["error"]
    status, _, doc = call(routed, "GET", "/items/%ff")
    assert status == 400 and "UTF-8" in doc["error"]
    status, _, doc = call(routed, "GET", "/items/1?q=%ff")
    assert status == 400 and "query" in doc["error"]


def test_unknown_path_is_404_and_another_method_405_with_allow(routed):
    status, headers, doc = call(routed, "GET", "/nowhere")
    assert status == 404 and "/nowhere" in doc["error"] and "/items/{item_id}" in doc["error"]
    assert "Allow" not in headers
    for method in ("DELETE", "PUT", "PATCH", "OPTIONS"):
        status, headers, doc = call(routed, method, "/items/1")
        assert status == 405 and headers["Allow"] == "GET, HEAD, POST" and method in doc["error"], doc
    status, headers, _ = call(routed, "POST", "/open", b"", token=None)   # a public path: no token needed
    assert status == 405 and headers["Allow"] == "GET"
    assert routed.handled == []


def test_the_token_is_needed_everywhere_but_on_public_routes(routed):
    assert call(routed, "GET", "/open", token=None)[0] == 200
    for method, path in (("GET", "/items/1"), ("HEAD", "/items/1"), ("POST", "/items/1"), ("GET", "/nowhere"),
                         ("DELETE", "/items/1")):
        for token in (None, "wrong", TOKEN + "x"):
            status, headers, _ = call(routed, method, path, b"abc" if method == "POST" else None, token=token)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", (method, path, token)
    assert routed.handled == [("open", None)]
    assert call(routed, "POST", "/items/1", b"abc")[2] == {"item": "1", "length": 3}


def test_a_body_is_read_only_for_its_route_within_the_limit(routed):
    port = routed.server_address[1]
    head = f"POST /items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
    # over the limit: refused before the handler, without waiting for the body (else: 408 body too slow)
    reply = exchange(port, (head + "Content-Length: 101\r\n\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 413") and b"over 100 bytes (the test's max_body)" in reply, reply
    reply = exchange(port, (head + "\r\n").encode())
    assert reply.startswith(b"HTTP/1.1 411"), reply
    # no token: not read either (401, not 408)
    reply = exchange(port, b"POST /items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 401"), reply
    assert routed.handled == []
    assert call(routed, "POST", "/items/1", b"x" * 100)[2] == {"item": "1", "length": 100}
    assert routed.handled == [("post", b"x" * 100)]


def test_the_routes_decide_body_limit_and_heavy(routed):
    ok, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer nope"}
    assert routed.body_limit("POST", "/items/7", ok) == 100
    assert routed.body_limit("POST", "/items/7", wrong) == 0
    assert routed.body_limit("GET", "/items/7", ok) == 0 and routed.body_limit("POST", "/open", ok) == 0
    assert routed.is_heavy("POST", "/items/7") and not routed.is_heavy("GET", "/items/7")


def test_authorized_and_a_route_declared_twice():
    assert authorized(None, {}) and authorized("abc", {"Authorization": "bearer  abc "})
    assert not authorized("abc", {}) and not authorized("abc", {"Authorization": "Basic abc"})
    assert not authorized("abc", {"Authorization": "Bearer abcd"})
    with pytest.raises(TypeError, match="GET /x declared twice"):
        class Twice(ResponseHandler):
            @route("GET", "/x")
            def a(self):
                pass

            @route("GET", "/x")
            def b(self):
                pass


# -- deadlines that cannot drop an answer, health that never queues, bodies that must keep coming ----------------
class Probed(ResponseHandler):
    """/slow waits until the test releases it; /healthz is a probe (a thread of its own)."""
    server_version = "probed"

    @route("GET", "/slow", token=False)
    def _slow(self):
        self.server.entered.release()
        self.server.release.wait(30)
        self._json(HTTPStatus.OK, {"slow": True})

    @route("GET", "/healthz", token=False, probe=True)
    def _healthz(self):
        self._json(HTTPStatus.OK, {"ok": True})


class ProbedServer(BoundedHTTPServer):
    def __init__(self, limits: Limits):
        self.entered, self.release = threading.Semaphore(0), threading.Event()
        super().__init__(("127.0.0.1", 0), Probed, AllowedHosts("127.0.0.1"), limits)


@pytest.fixture
def probed():
    yield from servers_of(ProbedServer, head_seconds=5.0, idle_seconds=5.0)


def test_health_never_queues_behind_slow_requests(probed):
    """Every worker busy and the queue full of slow reports: /healthz still answers 200 (before: 503, or a wait
    behind the reports)."""
    port, server = probed(workers=1, queue=1)
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(get(port, "/slow"))
        assert server.entered.acquire(timeout=10)          # the one worker is held; the other waits in the queue
        for _ in range(5):
            reply = exchange(port, get(port, "/healthz"), wait=10)
            assert reply.startswith(b"HTTP/1.1 200") and b'"ok": true' in reply, reply
    finally:
        server.release.set()
        for s in slow:
            s.close()


def test_an_answer_that_took_longer_than_the_write_deadline_is_still_sent(probed):
    """The write deadline starts with the answer's first byte: a handler that took longer than send_seconds
    (a query cancelled at its own limit, answered 503) still gets its answer out (before: an empty reply)."""
    port, server = probed(send_seconds=0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(get(port, "/slow"))
        assert server.entered.acquire(timeout=10)
        time.sleep(1.0)                 # the handler runs past send_seconds before it answers
        server.release.set()
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"slow": true' in reply, reply


def test_a_dripped_body_is_dropped_soon_after_the_grace(serve):
    """min_rate holds at every moment after the grace: a body announced and sent a byte at a time (each byte
    within idle_seconds) is dropped about head_seconds after it started, not after length / min_rate (here
    1 + 1000 / 100 = 11 s: before, such connections held their body budget that long)."""
    port, _ = serve(min_rate=100)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
        start, reply = time.monotonic(), b""
        s.settimeout(0.3)
        while not reply and time.monotonic() - start < 30:
            try:
                s.sendall(b"x")
                reply = s.recv(4096)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        took = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408") and b"body too slow" in reply, reply
    assert took < 6, f"dropped after {took:.1f} s"
