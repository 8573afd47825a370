"""`edge-inspect review`: the operator review page, served by the board itself (standard library only).

    edge-inspect review --config /etc/sem-inspect/service.yaml [--http 127.0.0.1:8081] [--operator NAME]
    edge-inspect review --db results.sqlite3 [--processed DIR] [--models BUNDLE] [...]

The page (edge_runtime/review/page.html, .css and .js: plain HTML, CSS and JavaScript, no build step, no
framework) shows the review queue (edge_runtime/review/reviews.py), one image at a time with its label, Stage-1 score
and Stage-2 top-3; a click or a key confirms or corrects the label or marks the image unusable. Reviews go into the store's
`reviews` table; results are never edited.

Routes (http_base's route table: an unknown path 404, another method 405 with Allow); every input is checked,
a bad request gets a 4xx status with {"error": "..."}:
    GET  /  /review.css  /review.js     the page (a fixed list of files: no path from the URL touches the disk)
    GET  /api/meta                      labels (the taxonomy + unusable), default operator, bundles
    GET  /api/queue?label=&state=&from=YYYY-MM-DD&to=YYYY-MM-DD&limit=&offset=
    GET  /api/summary                   counts per label and review state, corrections, per-bundle agreement
    GET  /api/conflicts                 reviews that disagree: results with the same image content whose latest
                                        reviews give different classes (left out of export and adaptation)
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

from edge_runtime.command import CommandError, add_log_level, reported, run_command
from edge_runtime.netnames import parse_host_names, parse_host_port
from edge_runtime.db.store import StorageError
from edge_runtime.exits import EXIT_OK
from edge_runtime.fleet import json_input
from edge_runtime.fleet.http_base import (AllowedHosts, BoundedHTTPServer, HTTPError, Limits, ResponseHandler,
                                         route, serve_until_stopped)
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


class ReviewServer(BoundedHTTPServer):
    max_body = MAX_BODY
    home_path = "/"                     # the page

    def __init__(self, address: tuple[str, int], reviews: Reviews, operator: str | None = None,
                 allowed_hosts: tuple[str, ...] = ()):
        self.reviews = reviews
        self.operator = operator
        self.static = {path: ((STATIC_DIR / name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}
        super().__init__(address, Handler, AllowedHosts(address[0], allowed_hosts),
                         Limits(body_budget=64 * MAX_BODY))


class Handler(ResponseHandler):
    server: ReviewServer
    server_version = "edge-inspect-review"
    fixed_headers = SECURITY_HEADERS

    def _error(self, exc: Exception) -> tuple[int, str] | None:
        return (exc.status, str(exc)) if isinstance(exc, ReviewError) else None

    @staticmethod
    def _result_id(raw: str) -> int:
        if not re.fullmatch(r"[1-9][0-9]{0,17}", raw):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"result id must be a positive integer, got {raw!r}")
        return int(raw)

    # -- GET ---------------------------------------------------------------------------------------------
    @route("GET", "/favicon.ico")
    def _favicon(self) -> None:
        self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")

    @route("GET", "/")
    @route("GET", "/review.css")
    @route("GET", "/review.js")
    def _static(self) -> None:
        body, ctype = self.server.static[self.request_path]
        self._send(HTTPStatus.OK, body, ctype)

    @route("GET", "/api/meta")
    def _meta(self) -> None:
        self._json(HTTPStatus.OK, {**self.server.reviews.meta(), "operator": self.server.operator})

    @route("GET", "/api/summary")
    def _summary(self) -> None:
        self._json(HTTPStatus.OK, self.server.reviews.summary())

    @route("GET", "/api/conflicts")
    def _conflicts(self) -> None:
        self._json(HTTPStatus.OK, self.server.reviews.conflicts())

    @route("GET", "/api/queue")
    def _queue(self) -> None:
        self._json(HTTPStatus.OK, self.server.reviews.queue(**self._queue_args(self.query)))

    @route("GET", "/api/results/{result_id}")
    def _item(self, result_id: str) -> None:
        self._json(HTTPStatus.OK, self.server.reviews.item(self._result_id(result_id)))

    @route("GET", "/api/results/{result_id}/image")
    def _result_image(self, result_id: str) -> None:
        fh, st, path = self.server.reviews.open_image(self._result_id(result_id))
        with fh:
            self._image(fh, st, path)

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
    @route("POST", "/api/results/{result_id}/reviews", body=True)
    def _add_review(self, result_id: str, body: bytes) -> None:
        result_id = self._result_id(result_id)
        review_doc = self._review_doc(body)
        reviewer = review_doc.get("reviewer") or self.server.operator
        if reviewer is None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "reviewer is required: enter the operator name")
        if "expected_review_id" not in review_doc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "expected_review_id is required (0 if the result had no review)")
        reviews = self.server.reviews
        try:
            review = reviews.add(result_id, review_doc.get("label"), reviewer, review_doc["expected_review_id"])
        except Conflict as exc:
            raise HTTPError(HTTPStatus.CONFLICT, str(exc), current=exc.current, item=reviews.item(result_id)) from None
        self._json(HTTPStatus.CREATED, {"review": review, "item": reviews.item(result_id)})

    def _review_doc(self, raw: bytes) -> dict:
        # Cross-site requests never get here: http_base refuses an Origin that is not this server's, and a
        # browser cannot send application/json to another origin without a CORS preflight (never granted).
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the review as application/json")
        try:
            body = json_input.loads(raw)
        except json_input.UntrustedJSON as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"request body is not acceptable JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        unknown = sorted(set(body) - REVIEW_FIELDS)
        if unknown:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(unknown)} "
                                                    f"(known: {', '.join(sorted(REVIEW_FIELDS))})")
        return body


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
