"""What the collector accepts: a board's result message (edge_runtime/fleet/publisher.py: the JSONL line plus
"board"), checked field by field; anything else is Rejected with the reason and goes to the dead letters.

    payload          at most MAX_PAYLOAD bytes of strict UTF-8 JSON (edge_runtime/fleet/json_input.py: no UTF-16,
                     no surrogates, finite numbers, integers within 64 bits, bounded nesting), one object
    id               integer 1 .. 2**63-1 (SQLite's INTEGER)
    board            the board of the topic (PREFIX/BOARD/result), a board name (edge_runtime/netnames.py)
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
from edge_runtime.netnames import BOARD_RULE, is_board_name
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


def _json(payload: bytes):
    """At most MAX_PAYLOAD bytes of strict JSON (edge_runtime/fleet/json_input.py), parsed; Rejected otherwise."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    try:
        return json_input.loads(payload)
    except json_input.UntrustedJSON as exc:
        raise Rejected(str(exc)) from None


def parse_result(board: str, payload: bytes) -> Result:
    """One result message from the topic of `board` -> Result; Rejected says why not."""
    if not is_board_name(board):
        raise Rejected(f"topic board {_short(board)} is not a board name ({BOARD_RULE})")
    msg = _json(payload)
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


def _status_doc(payload: bytes) -> dict | None:
    """A JSON status ({"status": ..., "bundle": ...}, edge_runtime/fleet/publisher.py), or None for plain text."""
    if not payload.lstrip().startswith(b"{"):
        return None
    doc = _json(payload)
    if not isinstance(doc, dict):
        raise Rejected("a status is a JSON object or online/offline")
    return doc


def parse_status(board: str, payload: bytes) -> str:
    """A board's status message: "online" or "offline", plain or as {"status": ...} (with the bundles' state)."""
    if not is_board_name(board):
        raise Rejected(f"topic board {_short(board)} is not a board name ({BOARD_RULE})")
    doc = _status_doc(payload)
    status = payload.decode("ascii", "replace") if doc is None else doc.get("status")
    if status not in STATUSES:
        raise Rejected(f"status must be one of {', '.join(STATUSES)}, got {_short(status if doc else payload[:40])}")
    return status


BUNDLE_STATE_COLUMNS = ("current", "candidate", "phase", "shadow_images", "agreement", "stage1_agreement",
                        "error_rate", "last_change_at", "last_change")


def parse_bundle_state(payload: bytes) -> dict | None:
    """The bundles' state a board reports with its status (edge_runtime/service/active.py snapshot), as the
    columns of fleet_bundle_state plus "payload" (the state as JSON); None when the status carries none."""
    doc = _status_doc(payload)
    if doc is None or doc.get("bundle") is None:
        return None
    b = doc["bundle"]
    if not isinstance(b, dict):
        raise Rejected("bundle must be an object")
    current = _hex(b, "current")
    if current is None:
        raise Rejected("bundle.current must be a bundle id")
    shadow = b.get("shadow") or {}
    change = b.get("last_change") or {}
    phase = b.get("phase")
    if not isinstance(shadow, dict) or not isinstance(change, dict) or \
            not (phase is None or (isinstance(phase, str) and len(phase) <= 32)):
        raise Rejected("bundle.shadow and bundle.last_change must be objects, bundle.phase short text")
    what, why = change.get("what"), change.get("why")
    if not all(v is None or (isinstance(v, str) and len(v) <= MAX_TEXT) for v in (what, why, change.get("at"))):
        raise Rejected("bundle.last_change fields must be text")
    images = shadow.get("images")
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 0):
        raise Rejected("bundle.shadow.images must be a count")
    return {"current": current, "candidate": _hex(b, "candidate"), "phase": phase, "shadow_images": images,
            "agreement": _number(shadow, "agreement", 0.0, 1.0, False),
            "stage1_agreement": _number(shadow, "stage1_agreement", 0.0, 1.0, False),
            "error_rate": _number(shadow, "error_rate", 0.0, 1.0, False),
            "last_change_at": change.get("at"), "last_change": None if what is None else f"{what}: {why or ''}",
            "payload": payload.decode("utf-8")}
