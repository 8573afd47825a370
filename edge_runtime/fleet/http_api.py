"""The watch service's HTTP API (`http: HOST:PORT`; the bounded server of edge_runtime/fleet/http_base.py).

    GET  /healthz                  {"ok", "model_loaded", "bundle_id", "folder_writable", "last_image_at",
                                   "backlog", "bundle", "mqtt_connected", "unpublished"}; 200 when ok, else 503
                                   ("bundle": current, candidate, shadow comparison, previous, phase,
                                   last_change, error: the last bundle that failed to load and why)
    GET  /metrics                  Prometheus text exposition (edge_runtime/fleet/metrics.py)
    GET  /results?since=ID&limit=N results with id > ID (default 0), oldest first, at most N (1..1000, default
                                   100): {"results": [...], "next": the last id (pass it as since=)}
    POST /inspect                  one image as the request body (any Content-Type); its result back as JSON.
                                   Not recorded: the drop folder stays the way results enter the store.

Bad input gets a 4xx with {"error": ...} and the server goes on: bad query values 400, a body that is not an
image 400, over http_max_bytes 413, no Content-Length 411, a missing or wrong bearer token (http_token set) 401
(every route but /healthz, and unknown paths), unknown path 404, another method on a known path 405 (with Allow).
The routing, the token check (constant time; the token is never logged) and the body rule are http_base's.

What the network can do to the board is bounded by http_base (slow senders, many connections, Host/Origin):
a POST /inspect body is read only once its token is checked and its Content-Length is within http_max_bytes,
and at most 2 x http_max_bytes of bodies are held at once (more: 503); inspections run one at a time on a thread
of their own, so /healthz answers whatever POST /inspect receives, and the drop folder is inspected by the
service's own thread regardless. Cross-site requests: a request carrying an Origin that is not this server's is
refused (403), so a web page cannot make the board inspect (or read) anything even without http_token.
"""
from __future__ import annotations

import logging
import re
import threading
from http import HTTPStatus
from typing import TYPE_CHECKING, Callable

from edge_runtime.config.service_config import ServiceConfig, inspector_args
from edge_runtime.netnames import parse_host_names, parse_host_port
from edge_runtime.db.journal import row_to_json
from edge_runtime.db.store import Store
from edge_runtime.fleet.http_base import (AllowedHosts, BoundedHTTPServer, HTTPError, Limits, ResponseHandler,
                                         route)

if TYPE_CHECKING:
    from edge_runtime.bundle import Bundle

log = logging.getLogger("edge_inspect")

MAX_LIMIT = 1000
_UINT = re.compile(r"[0-9]{1,18}")


class HttpApi(BoundedHTTPServer):
    """metrics: an edge_runtime.fleet.metrics.Metrics; health: what GET /healthz answers (any thread);
    current_bundle: the bundle the service inspects with now (POST /inspect loads its own interpreter of it)."""

    def __init__(self, cfg: ServiceConfig, metrics, health: Callable[[], dict], current_bundle: Callable[[], Bundle]):
        host, port = parse_host_port(cfg.http)
        self.cfg, self.metrics, self.health, self.current_bundle = cfg, metrics, health, current_bundle
        self.token, self.max_body, self.max_body_setting = cfg.http_token, cfg.http_max_bytes, "http_max_bytes"
        self._inspector = None
        self._inspect_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), Handler, AllowedHosts(host, parse_host_names(cfg.http_allowed_hosts)),
                         Limits(body_budget=2 * cfg.http_max_bytes))

    def start(self) -> None:
        host = self.server_address[0]
        if not self.cfg.http_token and not (host.startswith("127.") or host in ("::1", "localhost")):
            log.warning("http: listening on %s without http_token: anyone who can reach it can read results", host)
        self._thread = threading.Thread(target=self.serve_forever, name="http-api", daemon=True)
        self._thread.start()
        log.info("http: serving /healthz /metrics /results /inspect on %s%s (Host: %s)", self.url,
                 " (bearer token required)" if self.cfg.http_token else "", self.allowed_hosts.describe())

    def close(self) -> None:
        if self._thread:
            self.shutdown()
            self._thread.join(5.0)
        self.server_close()

    def bundle_changed(self) -> None:
        """The service swapped its bundle: the next POST /inspect loads the new one."""
        with self._inspect_lock:
            self._inspector = None

    def inspect(self, data: bytes) -> dict:
        """POST /inspect: its own interpreter (the service's belongs to the watch thread) of the service's
        current bundle, with the service's decode limits; one request at a time."""
        with self._inspect_lock:
            if self._inspector is None:
                from edge_runtime.inspector import Inspector
                self._inspector = Inspector(self.current_bundle().root, **inspector_args(self.cfg))
            result = self._inspector.inspect(data)
        self.metrics.timed(result)
        return {**result.to_dict(), "bundle_id": self._inspector.bundle.bundle_id}


class Handler(ResponseHandler):
    server: HttpApi
    server_version = "edge-inspect"
    fixed_headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    @route("GET", "/healthz", token=False, probe=True)
    def _healthz(self) -> None:
        health = self.server.health()
        self._json(HTTPStatus.OK if health["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, health)

    @route("GET", "/metrics")
    def _metrics(self) -> None:
        body, ctype = self.server.metrics.exposition()
        self._send(HTTPStatus.OK, body, ctype)

    @staticmethod
    def _uint(query: dict, name: str, default: int, low: int, high: int) -> int:
        values = query.get(name)
        if not values:
            return default
        if len(values) > 1 or not _UINT.fullmatch(values[0]) or not low <= int(values[0]) <= high:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"{name} must be one integer in {low}..{high}, got "
                                                    f"{', '.join(values)!r}")
        return int(values[0])

    @route("GET", "/results")
    def _results(self) -> None:
        query = self.query
        unknown = sorted(set(query) - {"since", "limit"})
        if unknown:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown parameter(s) {', '.join(unknown)} (known: since, limit)")
        since = self._uint(query, "since", 0, 0, 2**62)
        limit = self._uint(query, "limit", 100, 1, MAX_LIMIT)
        store = Store(self.server.cfg.db, durable=False)      # a reader of its own: this is another thread
        try:
            rows = store.since(since, limit)
        finally:
            store.close()
        board = self.server.cfg.board
        self._json(HTTPStatus.OK, {"results": [{**row_to_json(r), "board": board} for r in rows],
                                   "next": rows[-1]["id"] if rows else since})

    @route("POST", "/inspect", body=True, heavy=True)
    def _inspect(self, body: bytes) -> None:
        if self.query:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "POST /inspect takes no parameters")
        if not body:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "empty body: send one image")
        from edge_runtime.preprocess import ImageError
        try:
            result = self.server.inspect(body)
        except ImageError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"not a usable image: {exc}") from None
        self._json(HTTPStatus.OK, result)
