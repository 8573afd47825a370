"""The plumbing both HTTP servers of the board share (the review page and the fleet API): one place that
turns a handler's outcome or error into a response (JSON errors, never a traceback; an unread body closes the
connection) and writes status, headers and body with the server's fixed headers on every response."""
from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from edge_runtime.db.store import StorageError

log = logging.getLogger("edge_inspect.http")


class HTTPError(Exception):
    """A request the server refuses: status, message, and any extra fields for the JSON error body."""
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


class ResponseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fixed_headers: dict[str, str] = {}      # sent with every response (security, caching)

    def log_message(self, fmt, *args):
        log.debug("%s %s %s", self.server_version, self.address_string(), fmt % args)

    def _headers(self, status: int, ctype: str, length: int, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in {**self.fixed_headers, **(extra or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self._headers(status, ctype, len(body), extra)
        self.wfile.write(body)

    def _json(self, status: int, obj, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   extra)

    def _error(self, exc: Exception) -> tuple[int, str] | None:
        """A server's own error types -> (status, message); None: not one of them."""
        return None

    def _dispatch(self, fn) -> None:
        """Run one request handler; any error becomes a JSON error response and the server goes on."""
        self._body_read = False
        try:
            extra_body: dict = {}
            try:
                fn()
                return
            except HTTPError as exc:
                status, message, extra_body = exc.status, str(exc), exc.extra
            except StorageError as exc:
                log.error("%s: result database: %s", self.server_version, exc)
                status, message = HTTPStatus.SERVICE_UNAVAILABLE, f"result database: {exc}"
            except (BrokenPipeError, ConnectionResetError):
                return
            except Exception as exc:        # a bug must not take the server down
                known = self._error(exc)
                if known is None:
                    log.exception("%s: unexpected error on %s %s", self.server_version, self.command, self.path)
                    known = HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}"
                status, message = known
            if not self._body_read and self.headers.get("Content-Length", "0") != "0":
                self.close_connection = True    # an unread request body must not be taken for the next request
            extra = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
            self._json(status, {"error": message, **extra_body}, extra)
        except (BrokenPipeError, ConnectionResetError):
            pass
