"""Bundle signing on the machine that makes bundles (edge_runtime/signing.py holds the format and the check):

    python -m convert keygen --out keys/ [--name release]     -> keys/release.key (private, 0600), release.pub
    python -m convert sign models/NAME --key keys/release.key   -> models/NAME/manifest.sig

`sign` checks the bundle first (every file against the manifest: a bundle is signed only whole), refuses a key
that lies inside the bundle and a bundle that holds any private key, and writes manifest.sig atomically. It
prints the key id and the bundle id, never the key. Boards trust the .pub file (service.yaml `trusted_keys:`).
No TensorFlow needed. Exit 0 ok, 2 bad input (the message says why).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from edge_runtime.bundle import MANIFEST, BundleError, load_bundle
from edge_runtime.signing import SIGNATURE, SignatureError, generate_key, holds_private_key, signature_for


def sign_bundle(bundle: str | os.PathLike, key: str | os.PathLike) -> tuple[Path, str, str]:
    """Write BUNDLE/manifest.sig; returns (its path, key id, bundle id). BundleError / SignatureError."""
    root = Path(bundle).resolve()
    loaded = load_bundle(root)                 # whole and unaltered, or refused here
    key_path = Path(key).resolve()
    if root == key_path.parent or root in key_path.parents:
        raise SignatureError(f"{key_path}: the private key lies inside the bundle; keep it outside (it would be "
                             "shipped to every board)")
    for f in sorted(root.iterdir()):
        if f.is_file() and holds_private_key(f):
            raise SignatureError(f"{f}: a private key inside the bundle; remove it before signing")
    manifest = (root / MANIFEST).read_bytes()
    sig = signature_for(manifest, key_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=root)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(sig)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    import json
    return root / SIGNATURE, json.loads(sig)["key_id"], loaded.bundle_id


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description="Bundle signing keys and signatures.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("keygen", help="make an Ed25519 key pair: DIR/NAME.key (private, 0600) and DIR/NAME.pub")
    g.add_argument("--out", required=True, type=Path, metavar="DIR")
    g.add_argument("--name", default="bundle-signing", help="file name of the pair (default: bundle-signing)")
    s = sub.add_parser("sign", help="sign a bundle's manifest: BUNDLE/manifest.sig")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--key", required=True, metavar="KEY", help="the private key (from keygen)")
    args = p.parse_args(argv)
    try:
        if args.command == "keygen":
            key, pub, key_id = generate_key(args.out, args.name)
            print(f"key id {key_id}: private key {key} (mode 0600: keep it off the boards and out of bundles), "
                  f"public key {pub} (give it to the boards: trusted_keys)")
        else:
            path, key_id, bundle_id = sign_bundle(args.bundle, args.key)
            print(f"signed bundle {bundle_id} with key {key_id}: {path}")
    except (BundleError, SignatureError, OSError) as exc:
        print(f"convert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
