"""JSON from the network (a review request body, a result message at the collector): parsed so that no input
can raise anything but UntrustedJSON (a ValueError with the reason) and no parsed value can fail later when it
is stored (SQLite refuses lone surrogates and integers beyond 64 bits; strict UTF-8 writers refuse surrogates).

    strict UTF-8 only            UTF-16/32 JSON and surrogates encoded as UTF-8 bytes are refused (json.loads
                                 would take UTF-16 bytes and decode the rest)
    no lone surrogates           a "\\ud800" escape is refused anywhere, keys included
    finite numbers only          NaN, Infinity and 1e999 (a float overflowing to infinity) are refused
    integers within 64 bits      -2**63 .. 2**63-1 (SQLite's INTEGER); Python's digit limit bounds parsing time
    bounded nesting              at most MAX_DEPTH levels (deeper input would raise RecursionError)
"""
from __future__ import annotations

import json
import math

MAX_DEPTH = 32
INT64 = (-2**63, 2**63 - 1)


class UntrustedJSON(ValueError):
    """Input that is not acceptable JSON; the message says why (safe to log and store: ASCII only)."""


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJSON(f"number {text[:40]!a} is not finite")
    return value


def _int(text: str) -> int:
    value = int(text)
    if not INT64[0] <= value <= INT64[1]:
        raise UntrustedJSON(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is outside 64 bits")
    return value


def _constant(name: str):
    raise UntrustedJSON(f"{name} is not a number JSON allows")


def _check_tree(value) -> None:
    """Depth and lone surrogates, iteratively (the check itself must not recurse on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UntrustedJSON("text holds a lone surrogate (\\ud800-\\udfff escape)") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise UntrustedJSON(f"nested deeper than {MAX_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def loads(raw: bytes) -> object:
    """bytes -> the parsed value under the rules above; UntrustedJSON otherwise."""
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedJSON(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
    except UntrustedJSON:
        raise
    except RecursionError:
        raise UntrustedJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:       # JSONDecodeError, and Python's limit on the digits of one integer
        raise UntrustedJSON(f"not valid JSON: {str(exc)[:120]!a}") from None
    _check_tree(value)
    return value
