"""Deprecated names of the central side, kept for one release: the collector, its read API and the rollout
publisher are the top-level package `central` (`python -m central`, `sem-collect`, `sem-central-api`,
`sem-rollout`). Nothing here imports it; each old command only runs the new one, after one line on stderr."""
from __future__ import annotations

import runpy
import sys


def run_moved(old: str, new: str) -> None:
    print(f"warning: python -m {old} is deprecated and will be removed in the next release; "
          f"use python -m {new}", file=sys.stderr)
    try:
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "central":
            sys.exit(f"error: the central side (package 'central') is not installed here: {exc}")
        raise
