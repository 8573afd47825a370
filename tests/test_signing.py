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
