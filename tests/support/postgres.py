"""A throwaway PostgreSQL server: benchmarks/pgserver.py, the one the collector's benchmarks start (initdb and
pg_ctl in a temporary folder), or skip with the reason it cannot start here."""
from __future__ import annotations

import pytest

from benchmarks.pgserver import PostgresServer, PostgresUnavailable, unavailable_reason


def start_postgres() -> PostgresServer:
    """A started server (call .stop() when done), or skip the test with the reason."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no PostgreSQL server: {reason}")
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        pytest.skip(f"PostgreSQL could not start here: {exc}")
    return server
