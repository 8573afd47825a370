"""`edge-inspect review`: the operator review page, served by the board itself (standard library only).

    edge-inspect review --config /etc/sem-inspect/service.yaml [--http 127.0.0.1:8081] [--operator NAME]
    edge-inspect review --db results.sqlite3 [--processed DIR] [--models BUNDLE] [...]

The page (edge_runtime/review/page.html, .css and .js: plain HTML, CSS and JavaScript, no build step, no
framework) shows the review queue (edge_runtime/review/reviews.py), one image at a time with its label, Stage-1 score
and Stage-2 top-3; a click or a key confirms or corrects the label or marks the image unusable. Reviews go into the store's
`reviews` table; results are never edited.

Routes; every input is checked, a bad request gets a 4xx status with {"error": "..."}:
    GET  /  /review.css  /review.js     the page (a fixed list of files: no path from the URL touches the disk)
    GET  /api/meta                      labels (the taxonomy + unusable), default operator, bundles
    GET  /api/queue?label=&state=&from=YYYY-MM-DD&to=YYYY-MM-DD&limit=&offset=
    GET  /api/summary                   counts per label and review state, corrections, per-bundle agreement
    GET  /api/results/ID                one result with its latest review
    GET  /api/results/ID/image          its image, opened once from inside the processed folder without
                                        following symbolic links (`..`, links and paths elsewhere are refused)
                                        and served from that descriptor; TIFF is sent as PNG
    POST /api/results/ID/reviews        {"label", "reviewer", "expected_review_id"} -> 201, or 409 when another
                                        review landed since (see reviews.py: optimistic concurrency)

It binds to loopback by default; the page has no login, so bind another address only on a trusted network.
The network side is edge_runtime/fleet/http_base.py's bounded server: slow clients hold no thread, connections
and bodies are capped, and a request whose Host is not a name the server is bound for (plus --allowed-hosts)
or whose Origin is another site's is refused, so neither a cross-site page nor a DNS-rebound name can read
the queue or store a review.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from edge_runtime.command import CommandError, add_log_level, reported, run_command
from edge_runtime.netnames import parse_host_names, parse_host_port
from edge_runtime.db.store import StorageError
from edge_runtime.exits import EXIT_OK
from edge_runtime.fleet import json_input
from edge_runtime.fleet.http_base import (AllowedHosts, BoundedHTTPServer, HTTPError, Limits, ResponseHandler,
                                         serve_until_stopped)
from edge_runtime.heap import return_large_blocks
from edge_runtime.review.reviews import (Conflict, ReviewError, Reviews, add_database_flags, check_reviewer,
                                         database_paths, open_reviews)

log = logging.getLogger("edge_inspect.review")

PROG = "edge-inspect review"
DEFAULT_HTTP = "127.0.0.1:8081"
STATIC_DIR = Path(__file__).resolve().parent
STATIC = {"/": ("page.html", "text/html; charset=utf-8"),
          "/review.css": ("page.css", "text/css; charset=utf-8"),
          "/review.js": ("page.js", "text/javascript; charset=utf-8")}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
QUEUE_PARAMS = {"label", "state", "from", "to", "limit", "offset"}
REVIEW_FIELDS = {"label", "reviewer", "expected_review_id"}
MAX_BODY = 4096
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_RESULT = re.compile(r"^/api/results/([^/]+)(/image|/reviews)?$")


class ReviewServer(BoundedHTTPServer):
    def __init__(self, address: tuple[str, int], reviews: Reviews, operator: str | None = None,
                 allowed_hosts: tuple[str, ...] = ()):
        self.reviews = reviews
        self.operator = operator
        self.static = {route: ((STATIC_DIR / name).read_bytes(), ctype) for route, (name, ctype) in STATIC.items()}
        super().__init__(address, Handler, AllowedHosts(address[0], allowed_hosts),
                         Limits(body_budget=64 * MAX_BODY))

    def body_limit(self, method: str, path: str, headers) -> int:
        return MAX_BODY if method == "POST" else 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class Handler(ResponseHandler):
    server: ReviewServer
    server_version = "edge-inspect-review"
    fixed_headers = SECURITY_HEADERS

    def _error(self, exc: Exception) -> tuple[int, str] | None:
        return (exc.status, str(exc)) if isinstance(exc, ReviewError) else None

    def _route(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return unquote(parts.path, errors="strict"), parse_qs(parts.query, keep_blank_values=True)

    @staticmethod
    def _result_id(raw: str) -> int:
        if not re.fullmatch(r"[1-9][0-9]{0,17}", raw):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"result id must be a positive integer, got {raw!r}")
        return int(raw)

    # -- GET ---------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch(self._get)

    def _get(self) -> None:
        try:
            path, query = self._route()
        except UnicodeDecodeError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the URL is not valid UTF-8") from None
        reviews = self.server.reviews
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if path in self.server.static:
            body, ctype = self.server.static[path]
            return self._send(HTTPStatus.OK, body, ctype)
        if path == "/api/meta":
            return self._json(HTTPStatus.OK, {**reviews.meta(), "operator": self.server.operator})
        if path == "/api/summary":
            return self._json(HTTPStatus.OK, reviews.summary())
        if path == "/api/queue":
            return self._json(HTTPStatus.OK, reviews.queue(**self._queue_args(query)))
        m = _RESULT.match(path)
        if m and m.group(2) is None:
            return self._json(HTTPStatus.OK, reviews.item(self._result_id(m.group(1))))
        if m and m.group(2) == "/image":
            fh, st, path = reviews.open_image(self._result_id(m.group(1)))
            with fh:
                return self._image(fh, st, path)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    @staticmethod
    def _queue_args(query: dict[str, list[str]]) -> dict:
        unknown = sorted(set(query) - QUEUE_PARAMS)
        if unknown:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown parameter(s) {', '.join(unknown)} "
                                                    f"(known: {', '.join(sorted(QUEUE_PARAMS))})")
        args = {}
        for key, values in query.items():
            if len(values) != 1:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"parameter {key} given {len(values)} times")
            value = values[0]
            if value == "":
                continue                    # an empty filter field means "any"
            if key in ("limit", "offset"):
                if not re.fullmatch(r"[0-9]{1,9}", value):
                    raise HTTPError(HTTPStatus.BAD_REQUEST, f"{key} must be a whole number, got {value!r}")
                value = int(value)
            args[{"from": "date_from", "to": "date_to"}.get(key, key)] = value
        return args

    def _image(self, fh, st: os.stat_result, path: str) -> None:
        """Serve the image from the descriptor that was checked (never opened again by name)."""
        ctype = IMAGE_TYPES.get(PurePosixPath(path).suffix.lower())
        if ctype is None:           # TIFF and the like: browsers cannot show them; decode as the model does
            from PIL import Image

            from edge_runtime.preprocess import DEFAULT_MAX_BYTES, ImageError, decode_image
            try:
                pixels = decode_image(fh.read(DEFAULT_MAX_BYTES + 1))
            except ImageError as exc:
                raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, f"image cannot be decoded: {exc}") from None
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            return self._send(HTTPStatus.OK, buf.getvalue(), "image/png")
        self._headers(HTTPStatus.OK, ctype, st.st_size)
        left = st.st_size               # exactly the size announced, even if the file grows meanwhile
        while left > 0 and (chunk := fh.read(min(left, 1 << 16))):
            self.wfile.write(chunk)
            left -= len(chunk)
        if left:
            self.close_connection = True    # it shrank: the response is short, the connection cannot be reused

    # -- POST --------------------------------------------------------------------------------------------
    def do_POST(self):
        self._dispatch(self._post)

    def _post(self) -> None:
        try:
            path, query = self._route()
        except UnicodeDecodeError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the URL is not valid UTF-8") from None
        m = _RESULT.match(path)
        if not m or m.group(2) != "/reviews":
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        result_id = self._result_id(m.group(1))
        body = self._body()
        reviewer = body.get("reviewer") or self.server.operator
        if reviewer is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "reviewer is required: enter the operator name")
        if "expected_review_id" not in body:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "expected_review_id is required (0 if the result had no review)")
        reviews = self.server.reviews
        try:
            review = reviews.add(result_id, body.get("label"), reviewer, body["expected_review_id"])
        except Conflict as exc:
            raise HTTPError(HTTPStatus.CONFLICT, str(exc), current=exc.current, item=reviews.item(result_id)) from None
        self._json(HTTPStatus.CREATED, {"review": review, "item": reviews.item(result_id)})

    def _body(self) -> dict:
        # Cross-site requests never get here: http_base refuses an Origin that is not this server's, and a
        # browser cannot send application/json to another origin without a CORS preflight (never granted).
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the review as application/json")
        try:
            body = json_input.loads(self.request_body(MAX_BODY))
        except json_input.UntrustedJSON as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"request body is not acceptable JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        unknown = sorted(set(body) - REVIEW_FIELDS)
        if unknown:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(unknown)} "
                                                    f"(known: {', '.join(sorted(REVIEW_FIELDS))})")
        return body

    # -- anything else -----------------------------------------------------------------------------------
    def _not_allowed(self):
        def refuse():
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed")
        self._dispatch(refuse)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------
def parse_http(value: str) -> tuple[str, int]:
    """HOST:PORT ([::1]:PORT for IPv6); port 0 picks a free one."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ValueError(f"--http {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The operator review page for a result database.")
    add_database_flags(p)
    p.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT",
                   help=f"address to serve on (default {DEFAULT_HTTP}: this machine only; port 0: any free one)")
    p.add_argument("--operator", metavar="NAME", help="reviewer name used when the page sends none")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="host names (or addresses) besides the --http address that browsers use to reach the page, "
                        "comma-separated (e.g. sem-tool-07,sem-tool-07.fab.local); other names are refused (DNS "
                        "rebinding)")
    p.add_argument("--models", metavar="BUNDLE",
                   help="take the class list from this bundle (needed only for a database that records no bundle)")
    add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), serve, argv)


def serve(args: argparse.Namespace) -> int:
    with reported(ValueError):
        host, port = parse_http(args.http)
    with reported(ReviewError, prefix="--operator: "):
        operator = None if args.operator is None else check_reviewer(args.operator)
    with reported(ValueError, prefix="--allowed-hosts: "):
        allowed = parse_host_names(args.allowed_hosts)
    with reported(ReviewError, StorageError):
        reviews = open_reviews(*database_paths(args), args.models)
    try:
        server = ReviewServer((host, port), reviews, operator, allowed)
    except OSError as exc:
        reviews.store.close()
        raise CommandError(f"--http {args.http}: cannot listen: {exc.strerror or exc}") from exc
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s: reachable from the network, and the page has no login", host)
    return_large_blocks()       # decoded TIFFs' memory goes back to the system (edge_runtime/heap.py)
    print(f"{PROG}: serving {server.url} (db {reviews.store.path}, images from {reviews.processed}; "
          f"Host: {server.allowed_hosts.describe()})", file=sys.stderr, flush=True)
    serve_until_stopped(server, reviews.store.close)
    return EXIT_OK
