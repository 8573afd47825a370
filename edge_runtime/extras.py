"""Optional packages: imported only where a setting uses them, and a missing one named with the pip line of
the extra that installs it (`fleet` on a board, `central` on the central side)."""
from __future__ import annotations

import importlib


class MissingExtra(RuntimeError):
    """A setting is used but the package it needs is not installed; the message says how to install it."""


def install_hint(extra: str) -> str:
    return f'pip install "sem-inspect[{extra}]"'


def need(module: str, setting: str, package: str, extra: str = "fleet"):
    """Import an optional dependency, or raise MissingExtra naming `package` and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{setting} needs the {package} package: {install_hint(extra)}") from None
