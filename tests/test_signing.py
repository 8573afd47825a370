"""Signed bundles (edge_runtime/signing.py, `python -m convert keygen|sign`): a board with trusted keys refuses an
unsigned, wrongly signed or altered bundle with one line before any model is read; without trusted keys nothing
changes; private keys never end up in a bundle or a log; the edge venv runs without `cryptography` unless keys
are configured."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from convert.sign import main as sign_main
from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.inspector import Inspector
from edge_runtime.signing import SIGNATURE
from tests.support.paths import REPO

pytest.importorskip("cryptography", reason='bundle signatures need cryptography (pip install "sem-inspect[signing]")')


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    assert sign_main(["keygen", "--out", str(out / "trusted"), "--name", "release"]) == 0
    assert sign_main(["keygen", "--out", str(out / "other"), "--name", "release"]) == 0
    return {"key": out / "trusted" / "release.key", "pub": out / "trusted" / "release.pub",
            "dir": out / "trusted", "other_key": out / "other" / "release.key"}


@pytest.fixture
def bundle(tmp_path, tiny_bundle_v2):
    return Path(shutil.copytree(tiny_bundle_v2, tmp_path / "b"))


def test_keygen_makes_a_private_key_only_its_owner_reads(keys, capsys):
    assert keys["key"].stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in keys["key"].read_bytes() and b"PUBLIC KEY" in keys["pub"].read_bytes()
    assert sign_main(["keygen", "--out", str(keys["dir"]), "--name", "release"]) == 2     # never overwritten
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_signed_bundle_loads_and_says_who_signed_it(keys, bundle, capsys):
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 0
    out = capsys.readouterr().out
    b = load_bundle(bundle, trusted_keys=keys["pub"])
    assert b.signed_by and b.signed_by in out and b.bundle_id in out
    assert load_bundle(bundle, trusted_keys=keys["dir"]).signed_by == b.signed_by      # a folder of keys
    # The private key appears nowhere in the bundle, nor in what the command printed.
    secret = keys["key"].read_bytes()
    body = b"".join(secret.splitlines()[1:-1])
    for f in bundle.iterdir():
        data = f.read_bytes()
        assert body not in data and b"PRIVATE KEY" not in data, f
    assert body.decode() not in out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_unsigned_wrongly_signed_and_altered_bundles_are_refused_before_any_model(keys, bundle):
    b = load_bundle(bundle)
    model = b.stage1.path
    good_model = model.read_bytes()
    model.write_bytes(b"not a model")       # if a model were read first, the error would be its sha256
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle, trusted_keys=keys["pub"])
    assert "unsigned bundle" in _one_line(exc) and "sha256" not in str(exc.value)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle)
    model.write_bytes(good_model)

    assert sign_main(["sign", str(bundle), "--key", str(keys["other_key"])]) == 0      # a key the board does not trust
    with pytest.raises(BundleError) as exc:
        Inspector(bundle, trusted_keys=keys["pub"])
    assert "not among the 1 trusted key(s)" in _one_line(exc)

    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 0
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["gating"]["stage1_threshold"] = 0.01                  # altered after signing
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle, trusted_keys=keys["pub"])
    assert "does not match manifest.yaml" in _one_line(exc)

    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 0
    model.write_bytes(good_model[:-1] + bytes([good_model[-1] ^ 1]))   # a model altered: pinned by the manifest
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle, trusted_keys=keys["pub"])


def test_signing_refuses_a_key_inside_the_bundle_or_a_bundle_holding_a_private_key(keys, bundle, capsys):
    inside = bundle / "release.key"
    shutil.copy(keys["key"], inside)
    assert sign_main(["sign", str(bundle), "--key", str(inside)]) == 2
    assert "the private key lies inside the bundle" in capsys.readouterr().err
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 2
    assert "private key inside the bundle" in capsys.readouterr().err
    assert not (bundle / SIGNATURE).exists()


def test_a_board_can_trust_only_public_keys(keys, bundle):
    with pytest.raises(BundleError, match="private key"):
        load_bundle(bundle, trusted_keys=keys["key"])


def test_edge_venv_runs_without_cryptography_unless_keys_are_set(keys, bundle, tmp_path):
    """The edge venv (no cryptography there): unchanged without trusted keys; with them, one clear line."""
    python = REPO / ".venv-edge" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-edge (make setup-edge)")
    probe = subprocess.run([str(python), "-c", "import cryptography"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(".venv-edge has cryptography installed: cannot show the runtime without it")
    from tests.support.images import png_bytes
    image = tmp_path / "w.png"
    image.write_bytes(png_bytes(1))
    cmd = [str(python), "-m", "edge_runtime.cli", "--models", str(bundle), "--threads", "1"]
    ok = subprocess.run(cmd + [str(image)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(cmd + ["--trusted-keys", str(keys["pub"]), str(image)], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
    assert refused.returncode == 2
    assert "cryptography" in refused.stderr and 'sem-inspect[signing]' in refused.stderr


@pytest.mark.parametrize("plant", ["report", "folder", "link", "key_late_in_a_pinned_file"])
def test_signing_refuses_a_folder_holding_what_its_manifest_does_not_pin(keys, bundle, capsys, plant):
    if plant == "report":
        (bundle / "compare.md").write_text("| model | macro-F1 |\n")
    elif plant == "folder":
        (bundle / "extra").mkdir()
        (bundle / "extra" / "notes.txt").write_text("shipped with the folder\n")
    elif plant == "link":
        (bundle / "models.lnk").symlink_to(bundle / "manifest.yaml")
    else:       # a private key past the first MiB of a file in a sub-folder
        (bundle / "data").mkdir()
        (bundle / "data" / "blob.bin").write_bytes(b"\0" * (2 << 20) + keys["key"].read_bytes())
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 2
    err = capsys.readouterr().err
    assert not (bundle / SIGNATURE).exists()
    if plant == "key_late_in_a_pinned_file":
        assert "private key inside the bundle" in err and "blob.bin" in err
    else:
        assert "does not pin" in err and {"report": "compare.md", "folder": "extra", "link": "models.lnk"}[plant] in err


def test_a_private_key_anywhere_in_a_file_is_found(tmp_path, keys):
    from edge_runtime.signing import holds_private_key
    big = tmp_path / "blob.bin"
    key = keys["key"].read_bytes()
    marker = key.index(b"PRIVATE KEY-----")
    # the marker straddles the 1 MiB chunk boundary
    big.write_bytes(b"\0" * ((1 << 20) - marker - 5) + key)
    assert holds_private_key(big)
    big.write_bytes(b"\0" * (3 << 20))
    assert not holds_private_key(big)


def test_the_release_counter_is_signed_with_the_bundle(keys, bundle, capsys):
    import json as _json

    from edge_runtime.signing import release_of
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"]), "--release", "41"]) == 0
    assert "release 41" in capsys.readouterr().out
    sig_path = bundle / SIGNATURE
    assert release_of(sig_path.read_bytes()) == 41
    assert load_bundle(bundle, trusted_keys=keys["pub"]).signed_by
    # the counter cannot be raised (or lowered) without the key: the statement is what is signed
    doc = _json.loads(sig_path.read_text())
    doc["statement"]["release"] = 10 ** 12
    sig_path.write_text(_json.dumps(doc))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle, trusted_keys=keys["pub"])
    # nor moved to another bundle: the statement names this manifest
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"]), "--release", "42"]) == 0
    manifest = bundle / "manifest.yaml"
    manifest.write_text(manifest.read_text() + "\n# edited\n")
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle, trusted_keys=keys["pub"])


def test_a_format_1_signature_still_verifies_as_release_0(keys, bundle):
    import base64
    import hashlib
    import json as _json

    from cryptography.hazmat.primitives import serialization

    from edge_runtime.signing import release_of
    private = serialization.load_pem_private_key(keys["key"].read_bytes(), password=None)
    manifest = (bundle / "manifest.yaml").read_bytes()
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"])]) == 0
    key_id = _json.loads((bundle / SIGNATURE).read_text())["key_id"]
    old = {"format": "sem-inspect-signature/1", "algorithm": "ed25519", "key_id": key_id,
           "bundle_id": hashlib.sha256(manifest).hexdigest(),
           "signature": base64.b64encode(private.sign(manifest)).decode()}
    (bundle / SIGNATURE).write_text(_json.dumps(old))
    assert load_bundle(bundle, trusted_keys=keys["pub"]).signed_by == key_id
    assert release_of((bundle / SIGNATURE).read_bytes()) == 0


def test_signing_a_clean_copy_leaves_the_reports_behind(keys, bundle, tmp_path, capsys):
    (bundle / "compare.md").write_text("| model | macro-F1 |\n")
    (bundle / "notes").mkdir()
    out = tmp_path / "signed"
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"]), "--out", str(out), "--release", "7"]) == 0
    capsys.readouterr()
    assert not (out / "compare.md").exists() and not (out / "notes").exists()
    assert load_bundle(out, trusted_keys=keys["pub"]).bundle_id == load_bundle(bundle).bundle_id
    assert not (bundle / SIGNATURE).exists()                      # the source is left as it was
    assert sign_main(["sign", str(bundle), "--key", str(keys["key"]), "--out", str(out)]) == 2      # never replaced
    assert "exists" in capsys.readouterr().err
