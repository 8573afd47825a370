"""The central read API: what the boards report to the collector, over HTTP, read-only.

    python -m central.api --db DB --listen HOST:PORT [--token-file FILE] [--allowed-hosts NAMES]

DB is the collector's database (a SQLite file or a postgresql:// URL); it is opened read-only (queries.py) and
never created, migrated or written: start the collector on it first. Routes (JSON):
    GET /healthz                  {"ok", "database", "schema_version"}; 200, or 503 when the database does not
                                  answer (no token needed: a probe)
    GET /boards                   {"boards": [{board, status, changed_at, results, last_recorded_at,
                                  bundle: {current, candidate, phase, shadow_images, agreement, ..., reported_at}
                                  or null}]}
    GET /counts?by=board,label,day,bundle_id,outcome&FILTERS
                                  {"by", "counts": [{...the by keys, "results"}], "truncated"}; day is the UTC day
                                  of recorded_at; no `by`: one total
    GET /results?FILTERS&limit=N&before=CURSOR
                                  {"results": [...], "next"}: newest first (recorded_at, board, id), N in 1..1000
                                  (default 100); pass `next` as before= for the next page (null: no more)
    FILTERS                       board, label, outcome, bundle_id, review=true|false, since, until (ISO-8601;
                                  no offset: UTC; since inclusive, until exclusive)
A bad or unknown parameter gets 400 {"error"} naming it; unknown path 404; methods other than GET and HEAD 405
(with Allow); a missing or wrong bearer token 401 (with --token-file: every route but /healthz, and unknown
paths); a database that does not answer 503. The token is read from a file (never from the command line) and
never logged. Routing, the token check and HEAD are http_base's route table.

The network side is the board's own hardened server (edge_runtime/fleet/http_base.py: slow clients hold no
thread, bounded connections and workers, Host allow-list against DNS rebinding, cross-origin requests refused,
no request bodies read); a query running over rows.QUERY_TIMEOUT_S is cancelled (503).
"""
from __future__ import annotations

import argparse
import logging
import sys
from http import HTTPStatus
from pathlib import Path

from central import queries
from central.options import add_db_flag
from central.queries import BadParameter, StorageError
from edge_runtime.command import CommandError, add_log_level, reported, run_command
from edge_runtime.exits import EXIT_OK
from edge_runtime.netnames import parse_host_names, parse_host_port
from edge_runtime.fleet.http_base import AllowedHosts, BoundedHTTPServer, ResponseHandler, route, serve_until_stopped

log = logging.getLogger("edge_inspect.central")

PROG = "python -m central.api"
READ = ("GET", "HEAD")
MAX_TOKEN_FILE = 4096


class CentralApi(BoundedHTTPServer):
    """reader: queries.open_reader's; http_token: the bearer token (None: none needed)."""

    def __init__(self, address: tuple[str, int], reader, http_token: str | None = None,
                 allowed_hosts: tuple[str, ...] = ()):
        self.reader = reader
        self.token = http_token
        super().__init__(address, Handler, AllowedHosts(address[0], allowed_hosts))


class Handler(ResponseHandler):
    server: CentralApi
    server_version = "sem-inspect-central"
    fixed_headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    def _error(self, exc: Exception) -> tuple[int, str] | None:
        if isinstance(exc, BadParameter):
            return HTTPStatus.BAD_REQUEST, str(exc)
        return None             # a StorageError (the database is down): 503 in http_base

    def _params(self, known: frozenset[str] = frozenset()) -> dict[str, str]:
        """The query string -> one value per parameter, each one of `known` (those this route takes)."""
        parsed = self.query
        unknown = sorted(set(parsed) - known)
        if unknown:
            raise BadParameter(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {self.request_path} "
                               f"(known: {', '.join(sorted(known)) or 'none'})")
        repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
        if repeated:
            raise BadParameter(f"parameter(s) {', '.join(repeated)} given more than once")
        return {name: values[0] for name, values in parsed.items()}

    @route(READ, "/healthz", token=False, probe=True)
    def _healthz(self) -> None:
        self._params()
        try:
            self._json(HTTPStatus.OK, {"ok": True, **queries.health(self.server.reader)})
        except StorageError as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"ok": False, "database": False, "error": str(exc)})

    @route(READ, "/boards")
    def _boards(self) -> None:
        self._params()
        self._json(HTTPStatus.OK, {"boards": queries.boards(self.server.reader)})

    @route(READ, "/counts")
    def _counts(self) -> None:
        params = self._params(frozenset({"by", *queries.FILTERS}))
        by = queries.parse_by(params.pop("by", None))
        self._json(HTTPStatus.OK, queries.counts(self.server.reader, by, queries.parse_filters(params)))

    @route(READ, "/results")
    def _results(self) -> None:
        params = self._params(frozenset({"limit", "before", *queries.FILTERS}))
        limit = queries.parse_limit(params.pop("limit", None))
        before = queries.parse_cursor(params.pop("before", None))
        self._json(HTTPStatus.OK, queries.results(self.server.reader, queries.parse_filters(params), before, limit))


def read_token(path: Path) -> str:
    """The bearer token: the first line of a small file, non-empty."""
    data = path.read_bytes()[:MAX_TOKEN_FILE + 1]
    if len(data) > MAX_TOKEN_FILE:
        raise ValueError(f"{path}: over {MAX_TOKEN_FILE} bytes: not a token file")
    lines = data.decode("utf-8").strip().splitlines()
    token = lines[0].strip() if lines else ""
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError(f"{path}: the first line must be the token (printable, no spaces)")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The central read API over the collector's database "
                                                       "(read-only).")
    add_db_flag(p)
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve on (127.0.0.1: this machine only; port 0: any free one)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="require `Authorization: Bearer TOKEN` (TOKEN: the file's first line) on every route but "
                        "/healthz")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="host names (or addresses) besides the --listen address that clients use, comma-separated; "
                        "other names in Host are refused (DNS rebinding)")
    add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), serve, argv)


def serve(args: argparse.Namespace) -> int:
    with reported(ValueError, prefix="--listen: "):
        host, port = parse_host_port(args.listen)
    with reported(ValueError, prefix="--allowed-hosts: "):
        allowed = parse_host_names(args.allowed_hosts)
    with reported(OSError, ValueError, prefix="--token-file: "):
        token = read_token(args.token_file) if args.token_file else None
    with reported(StorageError, prefix="--db: "):
        reader = queries.open_reader(args.db)
    try:
        server = CentralApi((host, port), reader, token, allowed)
    except OSError as exc:
        reader.close()
        raise CommandError(f"--listen {args.listen}: cannot listen: {exc.strerror or exc}") from exc
    if token is None and not (host.startswith("127.") or host in ("::1", "localhost")):
        log.warning("serving on %s without --token-file: anyone who can reach it can read the results", host)
    print(f"{PROG}: serving {server.url} (read-only{', bearer token required' if token else ''}; "
          f"Host: {server.allowed_hosts.describe()})", file=sys.stderr, flush=True)
    serve_until_stopped(server, reader.close)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
