"""What the collector accepts: a board's result message (edge_runtime/fleet/publisher.py: the JSONL line plus
"board"), checked field by field; anything else is Rejected with the reason and goes to the dead letters.

    payload          at most MAX_PAYLOAD bytes of strict UTF-8 JSON (edge_runtime/fleet/json_input.py: no UTF-16,
                     no surrogates, finite numbers, integers within 64 bits, bounded nesting), one object
    id               integer 1 .. 2**63-1 (SQLite's INTEGER)
    board            the board of the topic (PREFIX/BOARD/result), a board name (service_config.is_board_name)
    outcome          "inspected" or "quarantined"
    name             text; path, moved_to, reason, variant: text or null
    recorded_at      an ISO-8601 time
    label            inspected: a class name (edge_runtime/classnames.py); quarantined: null
    defect_class     null or a class name; stage2_probs: null or {class name: probability}
    stage1_score, confidence   inspected: a number in [0, 1]; quarantined: null
    review           inspected: true or false; quarantined: null
    latency_ms       null or a number >= 0
    sha256, bundle_id          null or 64 lowercase hex digits
Keys besides these are allowed (a newer board may send more) and kept in the stored payload.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

from edge_runtime.classnames import ClassNameError, check_class_name
from edge_runtime.config.service_config import BOARD_RULE, is_board_name
from edge_runtime.fleet import json_input

MAX_PAYLOAD = 64 * 1024
MAX_TEXT = 4096
STATUSES = ("online", "offline")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# The columns of the collector's result table besides board and id (storage.py).
COLUMNS = ("name", "label", "outcome", "stage1_score", "defect_class", "confidence", "review", "sha256", "bundle_id",
           "recorded_at")


class Rejected(ValueError):
    """A message the collector does not store as a result; the message (ASCII) says why."""


@dataclass(frozen=True)
class Result:
    board: str
    id: int
    columns: dict           # COLUMNS -> value
    message: dict           # the whole parsed message
    payload: str            # the message as received (valid UTF-8 text)


def _number(msg: dict, key: str, low: float, high: float | None, required: bool):
    value = msg.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or \
            (high is not None and value > high):
        rng = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise Rejected(f"{key} must be a number {rng}, got {_short(value)}")
    return float(value)


def _text(msg: dict, key: str, required: bool, limit: int = MAX_TEXT):
    value = msg.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise Rejected(f"{key} must be text of 1..{limit} characters, got {_short(value)}")
    return value


def _class(value, key: str, required: bool):
    if value is None and not required:
        return None
    try:
        return check_class_name(value, key)
    except ClassNameError as exc:
        raise Rejected(ascii(str(exc))[1:-1]) from None


def _hex(msg: dict, key: str):
    value = msg.get(key)
    if value is not None and not (isinstance(value, str) and _HEX64.fullmatch(value)):
        raise Rejected(f"{key} must be 64 lowercase hex digits or null, got {_short(value)}")
    return value


def _short(value) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_result(board: str, payload: bytes) -> Result:
    """One result message from the topic of `board` -> Result; Rejected says why not."""
    if not is_board_name(board):
        raise Rejected(f"topic board {_short(board)} is not a board name ({BOARD_RULE})")
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    try:
        msg = json_input.loads(payload)
    except json_input.UntrustedJSON as exc:
        raise Rejected(str(exc)) from None
    if not isinstance(msg, dict):
        raise Rejected(f"a result is a JSON object, got {type(msg).__name__}")
    rid = msg.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 1 <= rid <= json_input.INT64[1]:
        raise Rejected(f"id must be an integer 1..2**63-1, got {_short(rid)}")
    if msg.get("board") != board:
        raise Rejected(f"board {_short(msg.get('board'))} is not the topic's board {board!r}")
    outcome = msg.get("outcome")
    if outcome not in ("inspected", "quarantined"):
        raise Rejected(f"outcome must be 'inspected' or 'quarantined', got {_short(outcome)}")
    inspected = outcome == "inspected"
    recorded_at = _text(msg, "recorded_at", True, 64)
    try:
        _dt.datetime.fromisoformat(recorded_at)
    except ValueError:
        raise Rejected(f"recorded_at must be an ISO-8601 time, got {_short(recorded_at)}") from None
    for key in ("path", "moved_to", "reason", "variant"):
        _text(msg, key, False)
    review = msg.get("review")
    if (inspected and not isinstance(review, bool)) or (not inspected and review is not None):
        raise Rejected(f"review must be {'true or false' if inspected else 'null'} for an {outcome} result, "
                       f"got {_short(review)}")
    if not inspected:
        for key in ("label", "stage1_score", "confidence"):
            if msg.get(key) is not None:
                raise Rejected(f"{key} must be null for a quarantined result, got {_short(msg.get(key))}")
    probs = msg.get("stage2_probs")
    if probs is not None:
        if not isinstance(probs, dict) or len(probs) > 64:
            raise Rejected(f"stage2_probs must be null or an object of at most 64 classes, got {_short(probs)}")
        for cls, p in probs.items():
            _class(cls, "stage2_probs class", True)
            _number(probs, cls, 0.0, 1.0, True)
    _number(msg, "latency_ms", 0.0, None, False)
    columns = {
        "name": _text(msg, "name", True),
        "label": _class(msg.get("label"), "label", inspected),
        "outcome": outcome,
        "stage1_score": _number(msg, "stage1_score", 0.0, 1.0, inspected),
        "defect_class": _class(msg.get("defect_class"), "defect_class", False),
        "confidence": _number(msg, "confidence", 0.0, 1.0, inspected),
        "review": None if review is None else int(review),
        "sha256": _hex(msg, "sha256"),
        "bundle_id": _hex(msg, "bundle_id"),
        "recorded_at": recorded_at,
    }
    return Result(board=board, id=rid, columns=columns, message=msg, payload=payload.decode("utf-8"))


def parse_status(board: str, payload: bytes) -> str:
    """A board's status message: "online" or "offline"."""
    if not is_board_name(board):
        raise Rejected(f"topic board {_short(board)} is not a board name ({BOARD_RULE})")
    status = payload.decode("ascii", "replace")
    if status not in STATUSES:
        raise Rejected(f"status must be one of {', '.join(STATUSES)}, got {_short(payload[:40])}")
    return status
