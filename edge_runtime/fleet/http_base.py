"""What every HTTP server of the board shares (the fleet API, the review page, and later a central read API):
a server that holds against a hostile network, and one place that turns a handler's outcome or error into a
response (JSON errors, never a traceback).

BoundedHTTPServer, the serving model (one rule each, here):
    I/O      One thread (selectors) accepts connections and reads every request's head and body without
             blocking, so a slow or silent client holds a socket, never a thread.
    Slow     A head (request line and headers, at most `head_bytes`) must arrive within `head_seconds` (else
             408); a body must keep coming: at most `idle_seconds` between bytes, and after head_seconds of
             grace at least `min_rate` bytes/s on average at every moment (a body announced and dripped, or not
             sent at all, is dropped within seconds, not after length / min_rate); a kept-alive connection may
             idle `idle_seconds`.
    Many     At most `max_connections` are open; over it, the connection that has waited longest without
             completing a request is closed: slow senders go first, a client that sends its request at once
             (a health probe) always gets in.
    Bodies   A body is read only if the server allows one of that size to that request (`body_limit`, from
             the route table: e.g. POST /inspect with a valid token); otherwise the handler answers (401, 413,
             ...) without reading it. At most `body_budget` bytes of bodies are held at once across all
             connections; a body that does not fit is refused (503, Retry-After) before it is read.
    Threads  Complete requests are answered by `workers` threads through a bounded queue (full: 503 at once);
             requests the server calls heavy (`is_heavy`: POST /inspect) by `heavy_workers` threads of their own,
             and health probes (routes declared probe=True: /healthz) by a thread of their own, so neither an
             inspection nor a queue of slow reports ever holds up /healthz. The thread count is fixed:
             1 + workers + heavy_workers + 1.
    Writes   A response must be written within `send_seconds` from its first byte (the deadline starts when the
             answer is ready, so a handler that took long, e.g. a query cancelled at its own limit, still gets its
             answer out): a client that does not read holds a worker that long at most.
    Names    Host must be a name the server is bound for (AllowedHosts: DNS rebinding), and an Origin, when
             sent, must be this server's own origin: http(s), one of those names, and the port of the Host the
             request was sent to (an origin is scheme, host and port: a page from another port of the board's
             own address is another origin); else 421 / 403 before any handler runs.

ResponseHandler: a BaseHTTPRequestHandler run once per request on a worker thread, over the request bytes the
I/O thread read: `_dispatch` runs a route and turns HTTPError, StorageError and any bug into a JSON error;
`_send`/`_json` write responses with the server's fixed headers (a HEAD response without its body);
`request_body(limit)` is the body.

Routes, the one request-to-handler rule of every server: a handler method declares what it answers with
`@route(METHOD or (METHODS...), "/path/{name}", token=, body=, heavy=)` ({name}: one path segment, passed to
the method as a keyword); the skeleton then, in this order:
    path     the target's path, percent-decoded (not UTF-8: 400), matched against the table
    token    `authorized(server.token, headers)` (server.token None: no token needed); a route declared
             token=False needs none, nor does another method on its path; everything else (the other routes,
             an unknown path) needs it: 401 (WWW-Authenticate: Bearer), so a client without it learns nothing
             of what exists
    404      no route has that path; 405 with `Allow` when routes have it but not for this method
    body     body=True: the request body, read by the I/O thread only for that route (and only once its token
             is checked), Content-Length required (411), at most server.max_body bytes (413), passed to the
             method as `body`; any other request's body is never read
    heavy    heavy=True: answered by the heavy workers (is_heavy); probe=True: by the probe thread
A server's `url` is its address (plus `home_path`, the page a person opens).
"""
from __future__ import annotations

import collections
import errno
import functools
import hmac
import http.client
import inspect
import io
import ipaddress
import json
import logging
import os
import queue
import re
import resource
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from edge_runtime.netnames import canonical_host
from edge_runtime.exits import StorageError

log = logging.getLogger("edge_inspect.http")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HEAD_END = re.compile(rb"\r?\n\r?\n")
DRAIN_SECONDS, DRAIN_BYTES = 2.0, 1 << 20


class HTTPError(Exception):
    """A request the server refuses: status, message, any response headers it needs (Allow,
    WWW-Authenticate), and any extra fields for the JSON error body."""
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.extra, self.headers = status, extra, headers or {}


def authorized(token: str | None, headers) -> bool:
    """The bearer-token rule: `Authorization: Bearer TOKEN`, compared in constant time (token None: none
    needed)."""
    if token is None:
        return True
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def url_path(target: str) -> str:
    """The path of a request target, percent-decoded (UnicodeDecodeError when that is not UTF-8)."""
    return unquote(urlsplit(target).path, errors="strict")


# ---------------------------------------------------------------------------------------------------------
# routes
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str
    path: str                   # as declared: /api/results/{result_id}
    handler: str                # the name of the handler method
    token: bool                 # needs the server's token (when it has one)
    body: bool                  # reads a request body (at most server.max_body bytes)
    heavy: bool                 # answered by the heavy workers
    pattern: re.Pattern
    probe: bool = False         # a health probe: answered by a thread of its own


def route(methods: str | tuple[str, ...], path: str, *, token: bool = True, body: bool = False,
          heavy: bool = False, probe: bool = False):
    """Declare a ResponseHandler method as the answer to METHOD(S) PATH (see the module docstring); stack
    several to answer more than one path."""
    pattern = re.compile("".join(f"(?P<{part[1:-1]}>[^/]+)" if part.startswith("{") else re.escape(part)
                                 for part in re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", path)))

    def declare(fn):
        fn.http_routes = [*getattr(fn, "http_routes", ()),
                     *(Route(m, path, fn.__name__, token, body, heavy, pattern, probe)
                       for m in ((methods,) if isinstance(methods, str) else methods))]
        return fn
    return declare


class RouteTable:
    """A handler class's routes (collected from its @route methods)."""

    def __init__(self, routes: list[Route]):
        seen = set()
        for r in routes:
            if (r.method, r.path) in seen:
                raise TypeError(f"route {r.method} {r.path} declared twice")
            seen.add((r.method, r.path))
        self.routes = routes

    def at(self, path: str) -> dict[str, tuple[Route, dict[str, str]]]:
        """method -> (route, path parameters) for every route that matches `path`."""
        found = {}
        for r in self.routes:
            if m := r.pattern.fullmatch(path):
                found[r.method] = r, m.groupdict()
        return found

    def find(self, method: str, path: str) -> Route | None:
        hit = self.at(path).get(method)
        return hit[0] if hit else None

    def paths(self) -> list[str]:
        return sorted({r.path for r in self.routes})


# ---------------------------------------------------------------------------------------------------------
# Host and Origin
# ---------------------------------------------------------------------------------------------------------
def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_name(value: str | None) -> str | None:
    """The host in a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`) in canonical form
    (canonical_host); None when it is not one."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::[0-9]{1,5})?", (value or "").strip())
    return canonical_host(m.group(1)) if m else None


class AllowedHosts:
    """The Host names a server answers to: the address it is bound to; the loopback names when that is a
    loopback address; when it listens on every address (0.0.0.0, ::), the loopback names and any address
    literal (an address in Host cannot be rebound: DNS rebinding needs a name); and the configured names."""

    def __init__(self, bind_host: str, extra=()):
        bound = canonical_host(bind_host) or bind_host.lower()
        ip = _ip(bound)
        self.any_address = bool(ip is not None and ip.is_unspecified)
        loopback = bound == "localhost" or bool(ip is not None and ip.is_loopback)
        self.names = {bound, *extra} | (LOOPBACK_NAMES if loopback or self.any_address else set())

    def allows(self, host_header: str | None) -> bool:
        name = host_name(host_header)
        return name is not None and (name in self.names or (self.any_address and _ip(name) is not None))

    def allows_origin(self, origin: str, host_header: str | None) -> bool:
        """Whether a request's Origin is this server's own origin: http(s), a name this server answers to, and
        the host and port the request itself was sent to (its Host), each port defaulted by the origin's
        scheme."""
        try:
            parts = urlsplit(origin.strip())
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path.strip("/") or parts.query or parts.username:
            return False
        default = 443 if parts.scheme == "https" else 80
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", (host_header or "").strip())
        if m is None or not self.allows(parts.netloc):
            return False
        same_host = host_name(parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]") == \
            host_name(m.group(1))
        return same_host and (port or default) == (int(m.group(2)) if m.group(2) else default)

    def describe(self) -> str:
        return ", ".join(sorted(self.names)) + (", any IP address" if self.any_address else "")


# ---------------------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------------------
def response_head(status: int, ctype: str, length: int, headers: dict, server: str, close: bool) -> bytes:
    """Status line and headers of a response (the one layout both the handlers and the I/O thread write)."""
    status = HTTPStatus(status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Server: {server}",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {ctype}", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_body(status: int, message: str, **extra) -> bytes:
    return json.dumps({"error": message, **extra}, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Limits:
    workers: int = 4                # threads answering complete requests
    heavy_workers: int = 1          # threads of their own for heavy requests (is_heavy)
    queue: int = 32                 # complete requests waiting for a thread, per pool; over: 503
    max_connections: int = 256      # open connections; over: the longest-waiting incomplete one is closed
    head_bytes: int = 16 * 1024     # request line + headers
    head_seconds: float = 10.0      # a head must arrive within this
    idle_seconds: float = 10.0      # longest pause inside a body; longest keep-alive wait
    min_rate: int = 32 * 1024       # bytes/s a body must average (after head_seconds of grace)
    body_budget: int = 8 << 20      # bytes of request bodies held at once, all connections together
    send_seconds: float = 20.0      # a response must be written within this


HEAD, BODY, BUSY, DRAIN = "head", "body", "busy", "drain"
POOLS = ("work", "heavy", "probe")


class _Conn:
    """One client connection as the I/O thread sees it."""

    def __init__(self, sock: socket.socket, addr, now: float):
        self.sock, self.addr = sock, addr
        self.state = HEAD
        self.since = now            # start of the current wait (head, body, keep-alive or drain)
        self.last = now             # last bytes received
        self.served = 0             # requests answered on it
        self.buf = bytearray()      # head bytes (and whatever followed them)
        self.head = b""
        self.body: bytearray | bytes | None = None
        self.got = 0
        self.reserved = 0           # body-budget bytes held
        self.pool = "work"          # which threads answer its request (BoundedHTTPServer.pool_of)
        self.close_after = False    # a body was sent that was not read: the connection cannot be reused
        self.deadline = 0.0
        self.drained = 0


class BoundedHTTPServer:
    """The serving model in the module docstring; handlers are ResponseHandler subclasses whose routes say
    which requests need the token, carry a body (at most max_body bytes) and are heavy."""
    token: str | None = None        # the bearer token routes need (None: none)
    max_body: int = 0               # the largest body a body=True route takes
    max_body_setting: str = ""      # the setting max_body comes from, named in a 413
    home_path: str = ""             # what `url` points to

    def __init__(self, address: tuple[str, int], handler_class, allowed_hosts: AllowedHosts,
                 limits: Limits | None = None):
        host, port = address
        self.limits = limits or Limits()
        self.allowed_hosts = allowed_hosts
        self.RequestHandlerClass = handler_class
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
            self.socket.setblocking(False)
        except BaseException:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._conns: set[_Conn] = set()                 # I/O thread only
        self._returned: collections.deque = collections.deque()     # workers -> I/O thread
        self._budget_lock = threading.Lock()
        self._budget_used = 0
        self._pools = {kind: queue.Queue(self.limits.queue) for kind in POOLS}
        self._threads: list[tuple[str, threading.Thread]] = []
        # Never more connections than file descriptors allow (the rest of the process needs some too).
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._max_connections = self.limits.max_connections if soft == resource.RLIM_INFINITY else \
            min(self.limits.max_connections, max(8, soft - 64))
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.refused: collections.Counter = collections.Counter()      # why connections or requests were refused
        self._reported = collections.Counter()
        self._next_report = time.monotonic() + 60

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}{self.home_path}"

    # -- what the routes decide -----------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> Route | None:
        routes = getattr(self.RequestHandlerClass, "routes", None)
        return routes.find(method, path) if routes else None

    def body_limit(self, method: str, path: str, headers) -> int:
        """The largest body this request may carry (read before the handler runs); 0: none is read."""
        r = self._route(method, path)
        ok = r is not None and r.body and (not r.token or authorized(self.token, headers))
        return self.max_body if ok else 0

    def is_heavy(self, method: str, path: str) -> bool:
        """Requests answered by the heavy workers (long-running, one at a time)."""
        r = self._route(method, path)
        return r is not None and r.heavy

    def pool_of(self, method: str, path: str) -> str:
        """Which threads answer a request: the probe thread (health), the heavy workers, or the workers."""
        r = self._route(method, path)
        return "probe" if r is not None and r.probe else "heavy" if self.is_heavy(method, path) else "work"

    # -- running --------------------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        lim = self.limits
        for kind, n in (("work", lim.workers), ("heavy", lim.heavy_workers), ("probe", 1)):
            for i in range(n):
                t = threading.Thread(target=self._work, args=(self._pools[kind],), daemon=True,
                                     name=f"{type(self).__name__}-{kind}-{i}")
                t.start()
                self._threads.append((kind, t))
        self._sel.register(self.socket, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(min(poll_interval, 0.25)):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._readable(key.data)
                self._expire(time.monotonic())
        finally:
            for conn in list(self._conns):
                if conn.state != BUSY:
                    self._close(conn)
            for fileobj in (self.socket, self._wake_r):
                try:
                    self._sel.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
            for kind, _ in self._threads:
                try:
                    self._pools[kind].put_nowait(None)          # one stop sign per worker
                except queue.Full:
                    pass
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait for it to return."""
        self._stop.set()
        self._wake()
        self._stopped.wait()
        for _, t in self._threads:
            t.join(timeout=5.0)
        self._threads = [(h, t) for h, t in self._threads if t.is_alive()]

    def server_close(self) -> None:
        self.socket.close()
        for conn in list(self._conns):
            self._close(conn)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = None
        self._sel.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (OSError, TypeError):
            pass

    # -- the I/O thread -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE and the like: make room, try again next round
                self._note(f"accept failed ({errno.errorcode.get(exc.errno, exc.errno)})")
                if not self._evict():
                    time.sleep(0.05)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # answers go out whole, at once
            if len(self._conns) >= self._max_connections and not self._evict():
                self._note("over max_connections")
                sock.close()
                continue
            conn = _Conn(sock, addr, time.monotonic())
            self._conns.add(conn)
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close the connection that has waited longest without completing a request (draining ones first)."""
        waiting = [c for c in self._conns if c.state != BUSY]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: (c.state != DRAIN, c.since))
        self._note("evicted (too many connections)")
        self._close(victim)
        return True

    def _readable(self, conn: _Conn) -> None:
        try:
            if conn.state == BODY:
                n = conn.sock.recv_into(memoryview(conn.body)[conn.got:])
            else:
                data = conn.sock.recv(65536)
                n = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if n == 0:
            self._close(conn)
            return
        conn.last = time.monotonic()
        if conn.state == DRAIN:
            conn.drained += n
            if conn.drained > DRAIN_BYTES:
                self._close(conn)
        elif conn.state == BODY:
            conn.got += n
            if conn.got == len(conn.body):
                self._body_done(conn)
        else:
            if not conn.buf:
                conn.since = conn.last          # a kept-alive connection: its next request starts now
            conn.buf += data
            self._head_maybe_done(conn)

    def _head_maybe_done(self, conn: _Conn) -> None:
        while conn.buf[:1] in (b"\r", b"\n"):     # stray line ends between requests
            del conn.buf[:1]
        m = _HEAD_END.search(conn.buf, 0, self.limits.head_bytes + 4)
        if m is None:
            if len(conn.buf) > self.limits.head_bytes:
                self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
            return
        head, rest = bytes(conn.buf[:m.end()]), bytes(conn.buf[m.end():])
        conn.buf = bytearray()
        conn.head = head
        first, _, fields = head.partition(b"\n")
        words = first.decode("latin-1").split()
        if len(words) != 3:
            return self._refuse(conn, HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return self._refuse(conn, HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or HTTP/1.1 only")
        try:
            headers = http.client.parse_headers(io.BytesIO(fields))
        except http.client.HTTPException:
            return self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many or too long headers")
        try:
            length = self._admit(method, target, version, headers)
        except HTTPError as exc:
            return self._refuse(conn, exc.status, str(exc), **exc.extra)
        try:
            path = url_path(target)
        except UnicodeDecodeError:
            path = ""                           # no route: the handler answers 400
        conn.pool = self.pool_of(method, path)
        if length == 0:
            conn.body, conn.buf = b"", bytearray(rest)
            return self._dispatch(conn)
        if length > self.body_limit(method, path, headers):
            conn.body, conn.close_after = None, True        # not read: the handler refuses it
            return self._dispatch(conn)
        with self._budget_lock:
            if self._budget_used + length > self.limits.body_budget:
                fits = False
            else:
                self._budget_used += length
                conn.reserved, fits = length, True
        if not fits:
            return self._refuse(conn, HTTPStatus.SERVICE_UNAVAILABLE, "busy: too many request bodies in flight; "
                                "retry later", retry=True)
        conn.body = bytearray(length)
        take = min(length, len(rest))
        conn.body[:take] = rest[:take]
        conn.got = take
        conn.buf = bytearray(rest[take:])
        if conn.got == length:
            return self._body_done(conn)
        conn.state, conn.since = BODY, time.monotonic()
        conn.deadline = conn.since + self.limits.head_seconds + length / self.limits.min_rate
        if "100-continue" in (headers.get("Expect") or "").lower():
            self._send_now(conn, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _admit(self, method: str, target: str, version: str, headers) -> int:
        """The checks every request passes before a handler runs; returns its Content-Length."""
        hosts = headers.get_all("Host") or []
        if len(hosts) > 1 or (not hosts and version == "HTTP/1.1"):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "exactly one Host header is required")
        if hosts and not self.allowed_hosts.allows(hosts[0]):
            raise HTTPError(HTTPStatus.MISDIRECTED_REQUEST, f"this server does not answer to the name in Host "
                            f"({hosts[0][:100]!a}); it answers to {self.allowed_hosts.describe()}")
        origins = headers.get_all("Origin") or []
        if len(origins) > 1 or (origins and not self.allowed_hosts.allows_origin(origins[0],
                                                                                 hosts[0] if hosts else None)):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"cross-origin request refused (Origin {origins[0][:100]!a})")
        if headers.get("Transfer-Encoding") is not None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length")
        lengths = headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip())):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "Content-Length must be one whole number")
        return int(lengths[0]) if lengths else 0

    def _body_done(self, conn: _Conn) -> None:
        conn.body = bytes(conn.body)        # bytes: handed on without further copies (io.BytesIO shares it)
        self._dispatch(conn)

    def _dispatch(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        conn.state = BUSY
        try:
            self._pools[conn.pool].put_nowait(conn)
        except queue.Full:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            self._release(conn)
            self._refuse(conn, HTTPStatus.SERVICE_UNAVAILABLE, "busy: too many requests waiting; retry later",
                         retry=True)

    def _send_now(self, conn: _Conn, data: bytes) -> None:
        """Best effort without blocking (a small response fits the socket buffer)."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _refuse(self, conn: _Conn, status: int, message: str, retry: bool = False, **extra) -> None:
        """Answer from the I/O thread and close (draining what the client still sends, so it reads the answer)."""
        self._note(f"{int(status)} {HTTPStatus(status).phrase}")
        body = error_body(status, message, **extra)
        headers = {**self.RequestHandlerClass.fixed_headers, **({"Retry-After": "5"} if retry else {})}
        self._send_now(conn, response_head(status, "application/json; charset=utf-8", len(body), headers,
                                           self.RequestHandlerClass.server_version, True) + body)
        self._start_drain(conn)

    def _start_drain(self, conn: _Conn) -> None:
        self._release(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        conn.state, conn.since, conn.drained, conn.body = DRAIN, time.monotonic(), 0, None
        conn.buf = bytearray()
        conn.deadline = conn.since + DRAIN_SECONDS

    def _take_back(self) -> None:
        """Connections the workers are done with: keep-alive ones wait for their next request, others drain."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._returned:
            conn, keep = self._returned.popleft()
            conn.sock.setblocking(False)
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            if not keep:
                self._start_drain(conn)
                continue
            conn.state, conn.since, conn.served = HEAD, time.monotonic(), conn.served + 1
            conn.head, conn.body, conn.got, conn.pool = b"", None, 0, "work"
            if conn.buf:
                self._head_maybe_done(conn)         # a pipelined request already read

    def _expire(self, now: float) -> None:
        lim = self.limits
        for conn in list(self._conns):
            if conn.state == HEAD:
                if conn.buf and now - conn.since > lim.head_seconds:
                    self._refuse(conn, HTTPStatus.REQUEST_TIMEOUT, f"request head not received within "
                                 f"{lim.head_seconds:g} s")
                elif not conn.buf and now - conn.since > (lim.idle_seconds if conn.served else lim.head_seconds):
                    self._note("idle connection closed")
                    self._close(conn)
            elif conn.state == BODY:
                late = now - conn.since - lim.head_seconds      # past the grace: min_rate on average, always
                if now - conn.last > lim.idle_seconds or now > conn.deadline or \
                        (late > 0 and conn.got < lim.min_rate * late):
                    self._refuse(conn, HTTPStatus.REQUEST_TIMEOUT, "request body too slow")
            elif conn.state == DRAIN and now > conn.deadline:
                self._close(conn)
        if now >= self._next_report:
            self._next_report = now + 60
            new = self.refused - self._reported
            if new:
                log.warning("%s: in the last minute: %s", type(self).__name__,
                            ", ".join(f"{n} {why}" for why, n in sorted(new.items())))
                self._reported = collections.Counter(self.refused)

    def _note(self, why: str) -> None:
        self.refused[why] += 1

    def _release(self, conn: _Conn) -> None:
        if conn.reserved:
            with self._budget_lock:
                self._budget_used -= conn.reserved
            conn.reserved = 0

    def _close(self, conn: _Conn) -> None:
        self._release(conn)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.body = None
        self._conns.discard(conn)

    # -- the workers ----------------------------------------------------------------------------------------
    def _work(self, pool: queue.Queue) -> None:
        while (conn := pool.get()) is not None:
            keep = False
            try:
                conn.sock.settimeout(self.limits.send_seconds)
                handler = self.RequestHandlerClass(conn, conn.addr, self)
                keep = not handler.close_connection and not conn.close_after
            except Exception:           # a bug must not take the worker down
                log.exception("%s: unexpected error", type(self).__name__)
            finally:
                self._release(conn)
                conn.body = None
            self._returned.append((conn, keep))
            self._wake()


class _DeadlineWriter(io.RawIOBase):
    """The response side of a connection: everything must be written within `seconds` of its first byte (the
    time a handler took before answering does not count)."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.seconds, self.deadline = sock, seconds, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("response not taken by the client in time")
        self.sock.settimeout(left)
        self.sock.sendall(data)
        return len(data)


class ResponseHandler(BaseHTTPRequestHandler):
    """One request (read by the server's I/O thread) answered on a worker thread, by the @route method that
    its method and path name."""
    protocol_version = "HTTP/1.1"
    fixed_headers: dict[str, str] = {}      # sent with every response (security, caching)
    server: BoundedHTTPServer
    routes = RouteTable([])                 # each subclass's own, from its @route methods
    request_path: str                       # the percent-decoded path the route was matched on

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.routes = RouteTable([r for _, fn in inspect.getmembers(cls, inspect.isfunction)
                                 for r in getattr(fn, "http_routes", ())])

    def setup(self) -> None:
        conn: _Conn = self.request
        self.connection = conn.sock
        self.rfile = io.BytesIO(conn.head)
        self.wfile = _DeadlineWriter(conn.sock, self.server.limits.send_seconds)
        self._request_body = conn.body

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        pass

    def handle_expect_100(self) -> bool:
        return True             # the I/O thread sent "100 Continue" when it took the body

    def log_message(self, fmt, *args):
        log.debug("%s %s %s", self.server_version, self.address_string(), fmt % args)

    def request_body(self, limit: int, setting: str = "") -> bytes:
        """The request's body: Content-Length required (411), at most `limit` bytes (413; `setting`: where the
        limit comes from)."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        if int(length) > limit or self._request_body is None:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request body over {limit} bytes" + (f" ({setting})" if setting else ""))
        return self._request_body

    @functools.cached_property
    def query(self) -> dict[str, list[str]]:
        """The query string: name -> its values (blank ones kept)."""
        try:
            return parse_qs(urlsplit(self.path).query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the query is not valid UTF-8") from None

    # -- routing --------------------------------------------------------------------------------------------
    def _serve(self) -> None:
        self._dispatch(self._run_route)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _run_route(self) -> None:
        """The route table's rules, in the order of the module docstring."""
        try:
            self.request_path = url_path(self.path)
        except UnicodeDecodeError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the URL is not valid UTF-8") from None
        here = self.routes.at(self.request_path)
        chosen = here.get(self.command)
        needs_token = chosen[0].token if chosen else all(r.token for r, _ in here.values())
        if needs_token and not authorized(self.server.token, self.headers):
            raise HTTPError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
        if not here:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.request_path[:100]!a} (known: "
                                                  f"{' '.join(self.routes.paths())})")
        if chosen is None:
            allow = ", ".join(sorted(here))
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed on "
                            f"{self.request_path[:100]!a} (allowed: {allow})", headers={"Allow": allow})
        r, params = chosen
        if r.body:
            params["body"] = self.request_body(self.server.max_body, self.server.max_body_setting)
        getattr(self, r.handler)(**params)

    def _headers(self, status: int, ctype: str, length: int, extra: dict | None = None, body: bytes = b"") -> None:
        """The status line and headers (with `body`, when it is given, in the same write)."""
        self.log_request(int(status))
        self.wfile.write(response_head(status, ctype, length, {**self.fixed_headers, **(extra or {})},
                                       self.server_version, self.close_connection) + body)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        # HEAD: the same status and headers as GET, without the body
        self._headers(status, ctype, len(body), extra, b"" if self.command == "HEAD" else body)

    def _json(self, status: int, obj, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   extra)

    def _error(self, exc: Exception) -> tuple[int, str] | None:
        """A server's own error types -> (status, message); None: not one of them."""
        return None

    def _dispatch(self, fn) -> None:
        """Run one request handler; any error becomes a JSON error response and the server goes on."""
        try:
            extra_body: dict = {}
            headers: dict = {}
            try:
                fn()
                return
            except HTTPError as exc:
                status, message, extra_body, headers = exc.status, str(exc), exc.extra, exc.headers
            except StorageError as exc:
                log.error("%s: result database: %s", self.server_version, exc)
                status, message = HTTPStatus.SERVICE_UNAVAILABLE, f"result database: {exc}"
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
                return
            except Exception as exc:        # a bug must not take the server down
                known = self._error(exc)
                if known is None:
                    log.exception("%s: unexpected error on %s %s", self.server_version, self.command, self.path)
                    known = HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}"
                status, message = known
            if self._request_body is None:
                self.close_connection = True    # a body that was not read must not be taken for the next request
            self._json(status, {"error": message, **extra_body}, headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True


def serve_until_stopped(server, *closing) -> None:
    """A command's server: serve until SIGTERM or Ctrl-C, then close the server and each of `closing` (its
    database) in that order."""
    def stop(signum, frame):
        raise KeyboardInterrupt         # leave serve_forever and close like Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for close in closing:
            close()
