"""Bundles a board derives (docs/security.md, "Bundles a board derives"): a board with trusted_keys runs the
bundle its own key derived from a trusted parent, keeping the parent's backbones, and refuses any other with one
line; the central side checks the chain and signs a clean copy for every board."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from convert.sign import main as convert_main
from edge_runtime.adapt.derive import derive_bundle
from edge_runtime.bundle import MANIFEST, BundleError, load_bundle
from edge_runtime.digest import sha256_bytes
from edge_runtime.service.rollout import _release
from edge_runtime.signing import (DERIVATION, PARENT_MANIFEST, PARENT_SIGNATURE, SIGNATURE, derivation_for,
                                  generate_key, release_of)
from tests.support.paths import REPO
from tests.support.review import class_png

pytest.importorskip("cryptography", reason='bundle signatures need cryptography (pip install "sem-inspect[signing]")')


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    made = {name: generate_key(out / name, name)[:2] for name in ("release", "rogue", "board", "other-board")}
    return {name: {"key": key, "pub": pub} for name, (key, pub) in made.items()}


def _signed_parent(tmp_path, tiny_bundle_v2, key, release=41) -> Path:
    parent = Path(shutil.copytree(tiny_bundle_v2, tmp_path / "parent"))
    assert convert_main(["sign", str(parent), "--key", str(key), "--release", str(release)]) == 0
    return parent


def _derive(parent: Path, out: Path, board_key: Path | None) -> Path:
    return derive_bundle(load_bundle(parent), out, gating={"stage1_threshold": 0.25}, board_key=board_key,
                         extra={"parent": {"bundle_id": load_bundle(parent).bundle_id, "path": str(parent)}})


def _refusal(keys, bundle: Path, board_key) -> str:
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle, trusted_keys=keys["release"]["pub"], board_key=board_key)
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_board_runs_the_bundle_it_derived_from_a_trusted_parent(keys, tiny_bundle_v2, tmp_path):
    parent = _signed_parent(tmp_path, tiny_bundle_v2, keys["release"]["key"])
    derived = _derive(parent, tmp_path / "derived", keys["board"]["key"])
    assert not (derived / SIGNATURE).exists()
    assert (derived / PARENT_MANIFEST).read_bytes() == (parent / MANIFEST).read_bytes()
    assert (derived / PARENT_SIGNATURE).read_bytes() == (parent / SIGNATURE).read_bytes()
    b = load_bundle(derived, trusted_keys=keys["release"]["pub"], board_key=keys["board"]["key"])
    assert b.stage1_threshold == 0.25 and b.derivation.parent_id == load_bundle(parent).bundle_id
    assert b.signed_by == b.derivation.board_key_id and b.derivation.parent_release == 41
    assert set(b.manifest["files"]) >= {PARENT_MANIFEST, PARENT_SIGNATURE}
    assert _release(derived) == 41          # the release floor counts a derived bundle as its parent's release
    # Without the board's key, the same board refuses it; a normally signed bundle is unaffected by one.
    assert "no board_key" in _refusal(keys, derived, None)
    assert load_bundle(parent, trusted_keys=keys["release"]["pub"], board_key=keys["board"]["key"]).derivation is None
    # Derived again from the derived bundle: the chain still leads to the signed parent.
    again = derive_bundle(b, tmp_path / "again", gating={"stage2_review_floor": 0.3}, board_key=keys["board"]["key"])
    b2 = load_bundle(again, trusted_keys=keys["release"]["pub"], board_key=keys["board"]["pub"])
    assert b2.derivation.parent_id == b.derivation.parent_id and b2.stage2_review_floor == 0.3


def test_a_derived_bundle_is_refused_with_one_line_unless_the_whole_chain_holds(keys, tiny_bundle_v2, tmp_path):
    board = keys["board"]["key"]
    untrusted = _derive(_signed_parent(tmp_path / "u", tiny_bundle_v2, keys["rogue"]["key"]), tmp_path / "d1", board)
    assert "is not signed by a trusted key" in _refusal(keys, untrusted, board)

    unsigned_parent = Path(shutil.copytree(tiny_bundle_v2, tmp_path / "unsigned"))
    from_unsigned = _derive(unsigned_parent, tmp_path / "d2", board)
    assert f"is not signed by a trusted key (no {PARENT_SIGNATURE})" in _refusal(keys, from_unsigned, board)

    parent = _signed_parent(tmp_path / "t", tiny_bundle_v2, keys["release"]["key"])
    by_other = _derive(parent, tmp_path / "d3", keys["other-board"]["key"])
    assert "derived by another board's key" in _refusal(keys, by_other, board)

    unsigned = _derive(parent, tmp_path / "d4", None)
    assert f"unsigned bundle (no {SIGNATURE})" in _refusal(keys, unsigned, board)

    altered = _derive(parent, tmp_path / "d5", board)
    m = yaml.safe_load((altered / MANIFEST).read_text())
    m["gating"]["stage1_threshold"] = 0.01
    (altered / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    assert "altered after it was derived" in _refusal(keys, altered, board)

    # The board's own key signs a derivation whose backbone is not the parent's: still refused.
    changed = _derive(parent, tmp_path / "d6", board)
    model = changed / m["variants"]["int8"]["stage1"]["file"]
    model.write_bytes(model.read_bytes() + b"\0")
    m = yaml.safe_load((changed / MANIFEST).read_text())
    m["variants"]["int8"]["stage1"].update(sha256=sha256_bytes(model.read_bytes()), bytes=model.stat().st_size)
    raw = yaml.safe_dump(m, sort_keys=False).encode()
    (changed / MANIFEST).write_bytes(raw)
    (changed / DERIVATION).write_bytes(derivation_for(raw, (parent / MANIFEST).read_bytes(), board))
    text = _refusal(keys, changed, board)
    assert "backbones are not its parent" in text and "variants" in text

    # A parent manifest swapped for another signed one is not the parent the derivation names.
    swapped = _derive(parent, tmp_path / "d7", board)
    (swapped / PARENT_MANIFEST).write_bytes((parent / MANIFEST).read_bytes() + b"# another\n")
    assert "is not its parent" in _refusal(keys, swapped, board)


def test_the_central_side_checks_the_chain_and_signs_a_copy_every_board_runs(keys, tiny_bundle_v2, tmp_path):
    parent = _signed_parent(tmp_path, tiny_bundle_v2, keys["release"]["key"])
    derived = _derive(parent, tmp_path / "derived", keys["board"]["key"])
    (derived / "adapt_report.json").write_text("{}")           # what adapt leaves beside the bundle

    def convert(*args):
        return subprocess.run([sys.executable, "-m", "convert", "derived", str(derived), "--trusted-keys",
                               str(keys["release"]["pub"]), *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)

    refused = convert("--board-pub", keys["other-board"]["pub"])
    assert refused.returncode == 2 and "another board's key" in refused.stderr
    out_dir = tmp_path / "fleet"
    res = convert("--board-pub", keys["board"]["pub"], "--key", keys["release"]["key"], "--out", out_dir,
                  "--release", 42)
    assert res.returncode == 0, res.stderr
    board_id = load_bundle(derived, trusted_keys=keys["release"]["pub"], board_key=keys["board"]["pub"]).signed_by
    assert f"derived by board key {board_id}" in res.stdout and "gating:" in res.stdout and "release 42" in res.stdout
    fleet = load_bundle(out_dir, trusted_keys=keys["release"]["pub"])        # no board key needed now
    assert fleet.derivation is None and release_of((out_dir / SIGNATURE).read_bytes()) == 42
    assert (out_dir / DERIVATION).is_file() and (out_dir / PARENT_MANIFEST).is_file()
    assert not (out_dir / "adapt_report.json").exists()


def test_edge_inspect_runs_its_own_derived_bundle_and_refuses_another_boards(keys, tiny_bundle_v2, tmp_path):
    parent = _signed_parent(tmp_path, tiny_bundle_v2, keys["release"]["key"])
    derived = _derive(parent, tmp_path / "derived", keys["board"]["key"])
    image = tmp_path / "one.png"
    image.write_bytes(class_png(1, 0))

    def inspect(board_key):
        return subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--models", str(derived), "--trusted-keys",
                               str(keys["release"]["pub"]), "--board-key", str(board_key), "--threads", "1",
                               str(image)], capture_output=True, text=True, cwd=REPO, timeout=300)

    ok = inspect(keys["board"]["key"])
    assert ok.returncode == 0, ok.stderr
    refused = inspect(keys["other-board"]["key"])
    assert refused.returncode == 2 and "another board's key" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
