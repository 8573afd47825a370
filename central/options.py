"""The central commands' shared flags, defined once: the broker (the collector, rollout publish and rollback) and
--db (the collector, rollout status, the read API).

--db is text: a SQLite file path or a postgresql:// URL, told apart by the storage's own rule
(storage.is_postgres_url); a URL made into a Path would lose its `//`.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from central.storage import is_postgres_url
from edge_runtime.fleet.mqtt import BrokerSettings
from edge_runtime.netnames import parse_host_port

DEFAULT_PREFIX = "sem-inspect"
DB_HELP = ("a SQLite file or postgresql://USER@HOST:PORT/NAME (PostgreSQL needs psycopg 3: "
           "pip install \"sem-inspect[central]\")")


def add_broker_flags(parser: argparse.ArgumentParser) -> None:
    """--broker HOST:PORT, --prefix, --username, --password-file, --tls, --ca (broker_settings reads them)."""
    g = parser.add_argument_group("broker")
    g.add_argument("--broker", required=True, metavar="HOST:PORT")
    g.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help=f"the boards' mqtt_prefix (default: {DEFAULT_PREFIX})")
    g.add_argument("--username")
    g.add_argument("--password-file", metavar="FILE", help="file holding the password (not on the command line)")
    g.add_argument("--tls", action="store_true", help="connect over TLS (the broker's certificate checked)")
    g.add_argument("--ca", metavar="FILE", help="CA certificate file for --tls (default: the system's)")


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    """The broker of add_broker_flags' flags; ValueError (a bad HOST:PORT) or OSError (the password file cannot
    be read)."""
    host, port = parse_host_port(args.broker)
    password = Path(args.password_file).read_text().strip() if args.password_file else None
    return BrokerSettings(host, port, args.username or None, password, args.tls, args.ca)


def add_db_flag(parser: argparse.ArgumentParser, what: str = "the collector's database") -> None:
    parser.add_argument("--db", required=True, metavar="PATH|URL", help=f"{what}: {DB_HELP}")


def redact(db: str) -> str:
    """--db for the log: a URL's password hidden."""
    if not is_postgres_url(db):
        return db
    return re.sub(r"^([a-z]+://[^:/@]+):[^@/]*@", r"\1:***@", db)
