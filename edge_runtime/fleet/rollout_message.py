"""The rollout message: what the central side (`python -m central.rollout`) publishes to a board and
what the board (edge_runtime/service/rollout.py) accepts. One definition, both sides.

Topic PREFIX/BOARD/rollout, QoS 1, retained (a board that was off receives the latest when it connects; a board
handles each message id once, so the retained copy delivered again at every reconnect does nothing).

    {"action": "rollout", "id": "r-20261202-1", "bundle_id": 64 hex (sha256 of manifest.yaml),
     "sha256": 64 hex (of the archive), "bytes": N, "url": "https://host/bundles/X.tar",
     "signature": {manifest.sig's fields: format, algorithm, key_id, signature, and statement (format 2)},
     "shadow": {"images": N, "minutes": T, "fraction": F},
     "bounds": {"min_agreement": A, "min_stage1_agreement": S, "max_error_rate": E},
     "at": ISO time}
    {"action": "rollback", "id": "...", "bundle_id": 64 hex or null (null: the previous bundle), "at": ...}

Anything else is refused with the reason (MessageError): at most MAX_BYTES of strict JSON
(edge_runtime/fleet/json_input.py), http or https URLs only, ids of plain characters, numbers in range.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edge_runtime import strict
from edge_runtime.fleet import json_input

MAX_BYTES = 16 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,79}")
DEFAULT_SHADOW = {"images": 200, "minutes": 60.0, "fraction": 1.0}
DEFAULT_BOUNDS = {"min_agreement": 0.95, "min_stage1_agreement": 0.95, "max_error_rate": 0.0}


class MessageError(ValueError):
    """A rollout message the board refuses; the text says why (ASCII)."""


@dataclass(frozen=True)
class Rollout:
    action: str                     # "rollout" | "rollback"
    id: str
    bundle_id: str | None
    sha256: str | None = None
    bytes: int | None = None
    url: str | None = None
    signature: dict = field(default_factory=dict)
    shadow: dict = field(default_factory=lambda: dict(DEFAULT_SHADOW))
    bounds: dict = field(default_factory=lambda: dict(DEFAULT_BOUNDS))
    raw: dict = field(default_factory=dict, repr=False)


def topic(prefix: str, board: str) -> str:
    return f"{prefix.strip('/')}/{board}/rollout"


def _hex(d: dict, key: str, required: bool = True) -> str | None:
    value = d.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise MessageError(f"{key} must be 64 lowercase hex digits")
    return value


SHADOW_RULES = {"images": strict.Number(1, 10**7, integer=True), "minutes": strict.Number(0.01, 7 * 24 * 60.0),
                "fraction": strict.Number(0.001, 1.0)}
BOUND_RULES = {key: strict.Number(0.0, 1.0) for key in DEFAULT_BOUNDS}
# The parts of a rollout that are numbers (edge_runtime/strict.py): shadow and bounds hold these keys only, each
# defaulted; other top-level keys are left to the checks below.
NUMBERS = strict.Keys({
    "bytes": strict.Field(strict.Number(1, 2**40, integer=True), None),
    "shadow": strict.Field(strict.Keys({k: strict.Field(rule, DEFAULT_SHADOW[k]) for k, rule in SHADOW_RULES.items()}),
                           lambda: dict(DEFAULT_SHADOW)),
    "bounds": strict.Field(strict.Keys({k: strict.Field(rule, DEFAULT_BOUNDS[k]) for k, rule in BOUND_RULES.items()}),
                           lambda: dict(DEFAULT_BOUNDS)),
}, extra="keep")


def parse(payload: bytes) -> Rollout:
    """A message from the network, checked (MessageError with the reason otherwise)."""
    if len(payload) > MAX_BYTES:
        raise MessageError(f"message of {len(payload)} bytes (at most {MAX_BYTES})")
    try:
        d = json_input.loads(payload)
    except json_input.UntrustedJSON as exc:
        raise MessageError(f"not acceptable JSON: {exc}") from None
    if not isinstance(d, dict):
        raise MessageError("not a JSON object")
    action, mid = d.get("action"), d.get("id")
    if not isinstance(mid, str) or not _ID.fullmatch(mid):
        raise MessageError("id must be 1-80 letters, digits, '.', '_', ':' or '-'")
    if action == "rollback":
        return Rollout("rollback", mid, _hex(d, "bundle_id", required=False), raw=d)
    if action != "rollout":
        raise MessageError("action must be 'rollout' or 'rollback'")
    url = d.get("url")
    parts = urlsplit(url) if isinstance(url, str) and len(url) <= 2048 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c in url for c in "\r\n\0 "):
        raise MessageError("url must be an http:// or https:// URL of at most 2048 characters")
    sig = d.get("signature")
    if not isinstance(sig, dict) or not all(isinstance(sig.get(k), str) and len(sig[k]) <= 512
                                            for k in ("format", "algorithm", "key_id", "signature")):
        raise MessageError("signature must hold the bundle's manifest.sig (format, algorithm, key_id, signature)")
    statement = sig.get("statement")
    if statement is not None and not (isinstance(statement, dict) and len(json.dumps(statement)) <= 1024):
        raise MessageError("signature.statement must be the signed statement of the bundle's manifest.sig")
    try:
        n = strict.read(d, NUMBERS)
    except strict.StrictError as exc:
        raise MessageError(ascii(str(exc))[1:-1]) from None
    if n["bytes"] is None:
        raise MessageError("bytes must be given: the archive's size")
    kept = {k: sig[k] for k in ("format", "algorithm", "key_id", "signature")}
    if statement is not None:           # checked with the signature by the one bundle reader
        kept["statement"] = statement
    return Rollout("rollout", mid, _hex(d, "bundle_id"), _hex(d, "sha256"), n["bytes"], url, kept, n["shadow"],
                   n["bounds"], raw=d)


def signature_bytes(msg: Rollout) -> bytes:
    """manifest.sig as the board writes it beside the fetched manifest (checked by the one bundle reader)."""
    return (json.dumps(msg.signature, indent=1) + "\n").encode("utf-8")
