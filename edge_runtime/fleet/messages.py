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
from dataclasses import dataclass

from edge_runtime import strict
from edge_runtime.classnames import CLASS
from edge_runtime.netnames import BOARD_RULE, is_board_name
from edge_runtime.fleet import json_input

MAX_PAYLOAD = 64 * 1024
MAX_TEXT = 4096
STATUSES = ("online", "offline")
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


_TEXT = strict.Optional(strict.Text(max_len=MAX_TEXT))
_HEX = strict.Optional(strict.Text(pattern="[0-9a-f]{64}", describe="64 lowercase hex digits or null"))
_SCORE = strict.Optional(strict.Number(0, 1))
# The result message's keys (edge_runtime/strict.py); others are allowed (a newer board may send more) and kept.
RESULT = strict.Keys({
    "id": strict.Number(1, json_input.INT64[1], integer=True),
    "board": strict.Anything(),                   # the topic's board, checked below
    "outcome": strict.Text(choices=("inspected", "quarantined")),
    "name": strict.Text(min_len=1, max_len=MAX_TEXT),
    "recorded_at": strict.Text(min_len=1, max_len=64),
    **{key: strict.Field(_TEXT, None) for key in ("path", "moved_to", "reason", "variant")},
    "label": strict.Field(strict.Optional(CLASS), None),
    "defect_class": strict.Field(strict.Optional(CLASS), None),
    "stage2_probs": strict.Field(strict.Optional(strict.MapOf(CLASS, strict.Number(0, 1), max_len=64)), None),
    "stage1_score": strict.Field(_SCORE, None),
    "confidence": strict.Field(_SCORE, None),
    "review": strict.Field(strict.Optional(strict.Boolean()), None),
    "latency_ms": strict.Field(strict.Optional(strict.Number(low=0)), None),
    "sha256": strict.Field(_HEX, None),
    "bundle_id": strict.Field(_HEX, None),
}, extra="keep")
# The bundles' state a board reports with its status: open too.
BUNDLE_STATE = strict.Keys({
    "current": strict.Text(pattern="[0-9a-f]{64}", describe="a bundle id (64 lowercase hex digits)"),
    "candidate": strict.Field(_HEX, None),
    "phase": strict.Field(strict.Optional(strict.Text(max_len=32)), None),
    "shadow": strict.Field(strict.Optional(strict.Keys({
        "images": strict.Field(strict.Optional(strict.Number(low=0, integer=True)), None),
        **{key: strict.Field(_SCORE, None) for key in ("agreement", "stage1_agreement", "error_rate")}},
        extra="keep")), None),
    "last_change": strict.Field(strict.Optional(strict.Keys(
        {key: strict.Field(_TEXT, None) for key in ("what", "why", "at")}, extra="keep")), None),
}, extra="keep")


def _checked(doc, spec, root: str = "") -> dict:
    try:
        return strict.read(doc, spec, root=root)
    except strict.StrictError as exc:
        raise Rejected(ascii(str(exc))[1:-1]) from None


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
    m = _checked(msg, RESULT)
    if msg.get("board") != board:
        raise Rejected(f"board {_short(msg.get('board'))} is not the topic's board {board!r}")
    inspected = m["outcome"] == "inspected"
    try:
        _dt.datetime.fromisoformat(m["recorded_at"])
    except ValueError:
        raise Rejected(f"recorded_at must be an ISO-8601 time, got {_short(m['recorded_at'])}") from None
    if inspected:
        for key in ("label", "stage1_score", "confidence", "review"):
            if m[key] is None:
                raise Rejected(f"{key} must be given for an inspected result")
    else:
        for key in ("label", "stage1_score", "confidence", "review"):
            if m[key] is not None:
                raise Rejected(f"{key} must be null for a quarantined result, got {_short(m[key])}")
    columns = {key: m[key] for key in COLUMNS}
    columns["review"] = None if m["review"] is None else int(m["review"])
    rid = m["id"]
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
    b = _checked(doc["bundle"], BUNDLE_STATE, "bundle")
    shadow, change = b["shadow"] or {}, b["last_change"] or {}
    what, why = change.get("what"), change.get("why")
    return {"current": b["current"], "candidate": b["candidate"], "phase": b["phase"],
            "shadow_images": shadow.get("images"), "agreement": shadow.get("agreement"),
            "stage1_agreement": shadow.get("stage1_agreement"), "error_rate": shadow.get("error_rate"),
            "last_change_at": change.get("at"), "last_change": None if what is None else f"{what}: {why or ''}",
            "payload": payload.decode("utf-8")}
