"""Result messages for the central collector, as boards publish them (edge_runtime/fleet/messages.py's wire
format): valid results, and a seeded fuzz of valid, duplicate, conflicting and malformed ones (UTF-16 JSON,
surrogates, integers beyond 64 bits, missing fields, wrong types, an 8 MB payload, deep nesting, random bytes,
bad status messages) with the collector's table counts they must leave."""
from __future__ import annotations

import json
import random

PREFIX = "sem-inspect"          # the topic prefix of the shipped broker ACL
MB = 2**20


def valid_result(board: str, rid: int, rng: random.Random) -> dict:
    """A valid result message of `board` with id `rid`, its values drawn from rng."""
    inspected = rng.random() < 0.85
    defect = rng.choice(["bridges", "cracks", "opens"]) if inspected and rng.random() < 0.5 else None
    score = round(rng.random(), 6)
    return {"id": rid, "path": f"/srv/sem/incoming/img{rid}.png", "name": f"img {rid}.png",
            "label": (defect or "clean") if inspected else None, "stage1_score": score if inspected else None,
            "defect_class": defect, "confidence": round(rng.random(), 6) if inspected else None,
            "review": (rng.random() < 0.2) if inspected else None, "latency_ms": round(rng.random() * 50, 3),
            "outcome": "inspected" if inspected else "quarantined", "reason": None if inspected else "corrupt",
            "moved_to": f"/srv/sem/processed/img{rid}.png", "sha256": "%064x" % rng.getrandbits(256),
            "variant": "int8", "bundle_id": "%064x" % rng.getrandbits(256),
            "stage2_probs": {"bridges": 0.5, "cracks": 0.3, "opens": 0.2} if defect else None,
            "recorded_at": "2026-12-02T10:00:00.000+00:00", "board": board}


def malformed(rng: random.Random, board: str, rid: int) -> tuple[str, bytes, str]:
    """(topic, payload, kind) of a message the collector must reject."""
    good = valid_result(board, rid, rng)
    topic = f"{PREFIX}/{board}/result"
    kind = rng.choice(["utf16", "utf8-surrogate", "escaped-surrogate", "id-2**64", "id-negative", "id-text",
                       "id-float", "id-bool", "review-10**30", "missing-field", "wrong-type", "score-range",
                       "nan", "deep", "random-bytes", "empty", "array", "truncated", "board-mismatch",
                       "hostile-label", "bad-time", "bad-status", "big-int-digits"])
    text = json.dumps(good)
    if kind == "utf16":
        return topic, text.encode("utf-16"), kind
    if kind == "utf8-surrogate":
        return topic, text.replace('"int8"', '"in\udc80t8"').encode("utf-8", "surrogatepass"), kind
    if kind == "escaped-surrogate":
        return topic, text.replace('"int8"', '"\\ud800"').encode(), kind
    if kind.startswith("id-") or kind == "review-10**30":
        value = {"id-2**64": 2**64, "id-negative": -rid, "id-text": str(rid), "id-float": rid + 0.5,
                 "id-bool": True, "review-10**30": 10**30}[kind]
        return topic, json.dumps({**good, ("review" if kind.startswith("review") else "id"): value}).encode(), kind
    if kind == "missing-field":
        key = rng.choice(["id", "board", "name", "outcome", "recorded_at"])
        return topic, json.dumps({k: v for k, v in good.items() if k != key}).encode(), kind
    if kind == "wrong-type":
        wrong = {"name": [[1, 2], 12345, {"a": 1}, ""], "label": [12345, ["clean"], True],
                 "stage1_score": ["0.5", [0.5], None], "confidence": ["high", {"p": 1}], "sha256": [12345, "ab"],
                 "stage2_probs": ["bridges", [0.5, 0.5], {"bridges": "0.5"}], "recorded_at": [12345, "later"],
                 "review": ["no", 0, 1]}
        key = rng.choice(list(wrong))
        return topic, json.dumps({**good, "outcome": "inspected", "label": "clean", "review": False,
                                  "stage1_score": 0.1, "confidence": 0.9, key: rng.choice(wrong[key])}).encode(), kind
    if kind == "score-range":
        return topic, json.dumps({**good, "outcome": "inspected", "label": "clean", "review": False,
                                  "stage1_score": 7.5, "confidence": 0.9}).encode(), kind
    if kind == "nan":
        return topic, text.replace('"latency_ms": ', '"latency_ms": NaN, "x": ').encode(), kind
    if kind == "deep":
        return topic, (b"[" * 5000) + (b"]" * 5000), kind
    if kind == "random-bytes":
        return topic, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))), kind
    if kind == "empty":
        return topic, b"", kind
    if kind == "array":
        return topic, json.dumps([good]).encode(), kind
    if kind == "truncated":
        return topic, text[: rng.randint(1, len(text) - 1)].encode(), kind
    if kind == "board-mismatch":
        return topic, json.dumps({**good, "board": "board-zz"}).encode(), kind
    if kind == "hostile-label":
        return topic, json.dumps({**good, "outcome": "inspected", "review": False, "stage1_score": 0.1,
                                  "confidence": 0.9, "label": rng.choice(["../../x", "/etc", "A B", "=1+1"])}
                                 ).encode(), kind
    if kind == "bad-time":
        return topic, json.dumps({**good, "recorded_at": "yesterday"}).encode(), kind
    if kind == "big-int-digits":
        return topic, text.replace(f'"id": {rid}', '"id": ' + "9" * 5000).encode(), kind
    return f"{PREFIX}/{board}/status", rng.choice([b"\xff\xfe", b"maybe", b"online" * 10, b""]), "bad-status"


def fuzz_messages(n: int, seed: int = 19) -> dict:
    """n messages (and one 8 MB payload) for the collector: {"messages": [(topic, payload)], "valid":
    {(board, id): message}, "kinds": {kind: count}, "expected": the collector's table counts afterwards}."""
    rng = random.Random(seed)
    messages: list[tuple[str, bytes]] = []
    valid: dict[tuple[str, int], dict] = {}
    kinds: dict[str, int] = {}
    conflicts = set()
    rid = 0
    while len(messages) < n:
        board = rng.choice(["board-a", "board-b", "board-c"])
        rid += 1
        roll = rng.random()
        if roll < 0.40:
            msg, kind = valid_result(board, rid, rng), "valid"
            valid[(board, rid)] = msg
            messages.append((f"{PREFIX}/{board}/result", json.dumps(msg).encode()))
        elif roll < 0.50 and valid:
            key, kind = rng.choice(list(valid)), "duplicate (same content)"
            messages.append((f"{PREFIX}/{key[0]}/result", json.dumps(valid[key]).encode()))
        elif roll < 0.55 and valid:
            key, kind = rng.choice(list(valid)), "conflict (same id, other content)"
            payload = json.dumps({**valid[key], "name": f"impostor-{rid}.png"}).encode()
            conflicts.add((key, payload))
            messages.append((f"{PREFIX}/{key[0]}/result", payload))
        else:
            topic, payload, kind = malformed(rng, board, rid)
            messages.append((topic, payload))
        kinds[kind] = kinds.get(kind, 0) + 1
    big = valid_result("board-a", rid + 1, rng)
    # valid but for its size (other keys are allowed): only the payload bound refuses it
    messages.append((f"{PREFIX}/board-a/result", json.dumps({**big, "note": "x" * (8 * MB)}).encode()))
    kinds["8 MB payload"] = 1
    rejected = sum(k for kind, k in kinds.items() if not kind.startswith(("valid", "duplicate", "conflict")))
    return {"messages": messages, "valid": valid, "kinds": dict(sorted(kinds.items())),
            "expected": {"results": len(valid), "dead_letters": rejected, "conflicts": len(conflicts)}}
