"""The one shape of a command's main: parse the flags, set up logging (--log-level), run, and turn an expected
problem into one `PROG: error: MESSAGE` line on stderr and its exit status (edge_runtime/exits.py).

Used by edge-inspect and its subcommands (review, export-labels, adapt) and by the central commands (the
collector, its read API, rollouts). Standard library only: edge-inspect's one-off path loads it with the runtime.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Callable

from edge_runtime.exits import EXIT_SETUP

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class CommandError(Exception):
    """An expected problem a person can fix: the command prints `PROG: error: MESSAGE` and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_SETUP):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def reported(*errors: type[BaseException], prefix: str = "", code: int = EXIT_SETUP):
    """Inside the block, any of `errors` is an expected problem: CommandError(prefix + its message, code)."""
    try:
        yield
    except errors as exc:
        raise CommandError(f"{prefix}{exc}", code) from exc


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("--log-level", default=default, choices=LOG_LEVELS,
                        help=f"the least severe log messages shown (default {default})")


def setup_logging(level: str = "INFO", fmt: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr, format=fmt)


def error(prog: str, message: str, code: int = EXIT_SETUP) -> int:
    """Say one error line on stderr; returns `code`."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def run_command(prog: str | Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
                body: Callable[[argparse.Namespace], int], argv: list[str] | None = None, *,
                log_format: str | None = LOG_FORMAT) -> int:
    """Parse argv, set up logging at --log-level (log_format None: the body does it, e.g. from a config file), and
    return body(args)'s exit status; a CommandError becomes its one line and its code. `prog` names the command
    in that line (a function of the parsed flags for a command with subcommands)."""
    args = parser.parse_args(argv)
    if log_format is not None:
        setup_logging(getattr(args, "log_level", None) or "INFO", log_format)
    try:
        return body(args)
    except CommandError as exc:
        return error(prog(args) if callable(prog) else prog, str(exc), exc.code)
