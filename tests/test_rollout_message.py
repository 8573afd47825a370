"""The rollout message (edge_runtime/fleet/rollout_message.py): what a board accepts, and the reason it gives for
anything else; and the bundle archive a board unpacks (edge_runtime/service/bundles.py): plain files only."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from edge_runtime.fleet.rollout_message import MessageError, parse
from edge_runtime.service.bundles import FetchError, unpack

GOOD = {"action": "rollout", "id": "r-1", "bundle_id": "a" * 64, "sha256": "b" * 64, "bytes": 1000,
        "url": "https://files.fab.local/b.tar",
        "signature": {"format": "sem-inspect-signature/1", "algorithm": "ed25519", "key_id": "0" * 16,
                      "signature": "c2ln"},
        "shadow": {"images": 10, "minutes": 5, "fraction": 0.5}, "bounds": {"min_agreement": 0.9}}


def test_a_valid_rollout_and_rollback_are_accepted_with_defaults():
    msg = parse(json.dumps(GOOD).encode())
    assert msg.action == "rollout" and msg.shadow == {"images": 10, "minutes": 5, "fraction": 0.5}
    assert msg.bounds["min_agreement"] == 0.9 and msg.bounds["max_error_rate"] == 0.0
    back = parse(b'{"action": "rollback", "id": "b-1"}')
    assert back.action == "rollback" and back.bundle_id is None


@pytest.mark.parametrize("change, reason", [
    ({"url": "file:///etc/passwd"}, "http:// or https://"),
    ({"url": "http://h/x y"}, "http:// or https://"),
    ({"url": "http://" + "a" * 3000}, "http:// or https://"),
    ({"id": "../../x"}, "id must be"),
    ({"action": "delete"}, "action must be"),
    ({"bundle_id": "A" * 64}, "bundle_id must be 64 lowercase hex"),
    ({"sha256": None}, "sha256 must be"),
    ({"bytes": -1}, "bytes must be"),
    ({"bytes": True}, "bytes must be"),
    ({"shadow": {"fraction": 2}}, "fraction must be"),
    ({"shadow": {"images": 1.5}}, "images must be an integer"),
    ({"shadow": {"bogus": 1}}, "shadow: unknown key 'bogus'"),
    ({"shadow": [1]}, "shadow must be a mapping"),
    ({"bounds": {"min_agreement": float("nan")}}, "not acceptable JSON"),
    ({"signature": "x"}, "signature must hold"),
])
def test_hostile_messages_are_refused_with_the_reason(change, reason):
    with pytest.raises(MessageError, match=reason):
        parse(json.dumps({**GOOD, **change}).encode())


@pytest.mark.parametrize("payload, reason", [(b"\xff\xfe{", "not acceptable JSON"), (b"[1]", "not a JSON object"),
                                             (b"{" + b" " * 20000 + b"}", "at most"), (b"[" * 100 + b"]" * 100, "JSON")])
def test_malformed_payloads_are_refused(payload, reason):
    with pytest.raises(MessageError, match=reason):
        parse(payload)


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("members, reason", [
    ([("../evil", tarfile.REGTYPE, b"x")], "not a plain file"),
    ([("sub/x", tarfile.REGTYPE, b"x")], "not a plain file"),
    ([("link", tarfile.SYMTYPE, b"")], "not a plain file"),
    ([(".hidden", tarfile.REGTYPE, b"x")], "not a plain file"),
    ([("a", tarfile.REGTYPE, b"x" * 2000)], "more than 1000 bytes"),
])
def test_an_archive_holds_plain_files_only(tmp_path, members, reason):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar(members))
    with pytest.raises(FetchError, match=reason):
        unpack(archive, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
