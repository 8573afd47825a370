"""The response plumbing both HTTP servers of the board share (the review page and the fleet API): one
place that writes status, headers and body, with the server's fixed headers on every response."""
from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler

log = logging.getLogger("edge_inspect.http")


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
