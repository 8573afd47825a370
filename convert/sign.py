"""Bundle signing on the machine that makes bundles (edge_runtime/signing.py holds the format and the check):

    python -m convert keygen --out keys/ [--name release]     -> keys/release.key (private, 0600), release.pub
    python -m convert sign models/NAME --key keys/release.key [--release N]   -> models/NAME/manifest.sig
    python -m convert sign models/NAME --key keys/release.key --out models/NAME-signed   (pinned files only)
    python -m convert derived BOARD-BUNDLE --trusted-keys keys/release.pub --board-pub boards/fab-1.pub
                      [--key keys/release.key --out models/NAME-signed [--release N]]

`sign` checks the bundle first (every file against the manifest: a bundle is signed only whole), refuses a
folder that holds anything its manifest does not pin (reports, sub-folders, links: whatever is copied with the
folder would reach the boards unsigned), a key that lies inside the bundle and a bundle that holds a private key
in any file, and writes manifest.sig atomically. The signature states a release counter (--release N, default the
signing time in seconds): a board refuses a bundle whose release is lower than the highest it accepted (an older
signed bundle replayed), unless an operator rolls back. It
prints the key id and the bundle id, never the key. Boards trust the .pub file (service.yaml `trusted_keys:`).
`derived` checks a bundle a board derived (`edge-inspect adapt` with its board key) by the board's own rule (its
parent signed by a trusted key, the derivation by that board's key, the parent's backbones), says what it
changed (heads, gating, replay set), and with --key signs a clean copy for every board (derivation.sig and the
parent's manifest and signature travel with it).
No TensorFlow needed. Exit 0 ok, 2 bad input (the message says why).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edge_runtime.bundle import MANIFEST, Bundle, BundleError, load_bundle
from edge_runtime.digest import sha256_file
from edge_runtime.signing import (DERIVATION, SIGNATURE, SignatureError, generate_key, holds_private_key,
                                  release_of, signature_for)


def sign_bundle(bundle: str | os.PathLike, key: str | os.PathLike, release: int | None = None,
                out: str | os.PathLike | None = None) -> tuple[Path, str, str]:
    """Write BUNDLE/manifest.sig, or (out) copy the bundle's pinned files into the new folder OUT and sign that;
    returns (the signature's path, key id, bundle id). BundleError / SignatureError."""
    root = Path(bundle).resolve()
    loaded = load_bundle(root)                 # whole and unaltered, or refused here
    if out is not None:
        root = clean_copy(loaded, Path(out).resolve())
    key_path = Path(key).resolve()
    if root == key_path.parent or root in key_path.parents:
        raise SignatureError(f"{key_path}: the private key lies inside the bundle; keep it outside (it would be "
                             "shipped to every board)")
    entries = everything_in(root)
    for f in entries:
        if f.is_file() and not f.is_symlink() and holds_private_key(f):
            raise SignatureError(f"{f}: a private key inside the bundle; remove it before signing")
    pinned = pinned_files(loaded)
    unpinned = [p for p in entries if p.relative_to(root).as_posix() not in pinned]
    if unpinned:
        shown = ", ".join(p.relative_to(root).as_posix() for p in unpinned[:5])
        more = f" and {len(unpinned) - 5} more" if len(unpinned) > 5 else ""
        raise SignatureError(f"{root}: holds what its manifest does not pin: {shown}{more}; a signed bundle is only "
                             "its pinned files (sign a clean copy with --out DIR, or move the rest elsewhere)")
    manifest = (root / MANIFEST).read_bytes()
    sig = signature_for(manifest, key_path, release)
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


def clean_copy(bundle: Bundle, out: Path) -> Path:
    """A new folder holding only the bundle's manifest and the files it pins (checked again as they are copied);
    the source's reports and anything else stay behind."""
    if os.path.lexists(out):
        raise SignatureError(f"--out {out} exists; give a new folder")
    names = {n for n in pinned_files(bundle) - {SIGNATURE} if n != DERIVATION or (bundle.root / n).is_file()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in sorted(names):
            shutil.copyfile(bundle.root / name, tmp / name, follow_symlinks=False)
        load_bundle(tmp)                        # the copy is whole (every pinned sha256)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def pinned_files(bundle: Bundle) -> set[str]:
    """The names a signed bundle may hold: the manifest, its signature, a board's derivation signature (a bundle a
    board derived, re-signed), and every file the manifest pins (the models, heads and replay set, checked when
    the bundle was loaded, and the extra files under `files:`, checked here)."""
    extras = bundle.manifest.get("files") or {}
    for name, entry in extras.items():
        path = bundle.root / name
        if not path.is_file() or path.is_symlink() or sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path}: missing or not the file the manifest pins (sha256 mismatch)")
    return {MANIFEST, SIGNATURE, DERIVATION, *bundle.files(), *extras}


def check_derived(bundle: str | os.PathLike, trusted_keys: str | os.PathLike,
                  board_pub: str | os.PathLike) -> tuple[Bundle, list[str]]:
    """A bundle a board derived, checked by the rule that board applies (edge_runtime/bundle.py load_bundle with
    the board's public key), and what it changed from its signed parent, one line each."""
    import yaml
    loaded = load_bundle(bundle, trusted_keys=trusted_keys, board_key=board_pub)
    d = loaded.derivation
    if d is None:
        raise SignatureError(f"{loaded.root}: not a bundle a board derived (it has its own {SIGNATURE}, by key "
                             f"{loaded.signed_by})")
    parent = yaml.safe_load(d.parent_manifest.decode("utf-8"))
    lines = [f"bundle {loaded.bundle_id}: derived by board key {d.board_key_id} from parent {d.parent_id} "
             f"(signed by {d.parent_key_id}, release {d.parent_release}); backbones are the parent's"]
    for n in (1, 2):
        mine, theirs = (m["stages"][f"stage{n}"] for m in (loaded.manifest, parent))
        if mine["head"]["sha256"] != theirs["head"]["sha256"]:
            lines.append(f"  stage {n} head: {theirs['head']['sha256'][:16]} -> {mine['head']['sha256'][:16]}, "
                         f"classes {mine['classes']}")
    for key in ("gating", "replay"):
        if loaded.manifest.get(key) != parent.get(key):
            lines.append(f"  {key}: {_short(parent.get(key))} -> {_short(loaded.manifest.get(key))}")
    adapted = loaded.manifest.get("adapted") or {}
    if adapted:
        lines.append(f"  adapted on {adapted.get('images')} image(s) {adapted.get('per_class')} "
                     f"({adapted.get('source') or 'source not recorded'})")
    return loaded, lines


def _short(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {str(v)[:16]}"
                               for k, v in value.items() if not isinstance(v, (dict, list))) + "}"
    return str(value)


def everything_in(root: Path) -> list[Path]:
    """Every entry under root (files, folders, links, anything), never following a link."""
    found = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        found += [Path(folder) / n for n in sorted(dirs + names)]
    return sorted(found)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description="Bundle signing keys and signatures.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("keygen", help="make an Ed25519 key pair: DIR/NAME.key (private, 0600) and DIR/NAME.pub")
    g.add_argument("--out", required=True, type=Path, metavar="DIR")
    g.add_argument("--name", default="bundle-signing", help="file name of the pair (default: bundle-signing)")
    s = sub.add_parser("sign", help="sign a bundle's manifest: BUNDLE/manifest.sig")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--key", required=True, metavar="KEY", help="the private key (from keygen)")
    s.add_argument("--out", metavar="DIR", help="copy only the files the manifest pins into this new folder and "
                                                "sign that (the bundle's reports stay behind)")
    s.add_argument("--release", type=int, metavar="N",
                   help="the release counter the signature states (default: the signing time in seconds); boards "
                        "refuse a release lower than the highest they accepted")
    d = sub.add_parser("derived", help="check a bundle a board derived (its chain to a signed parent) and, with "
                                       "--key, sign a clean copy of it for every board")
    d.add_argument("bundle", metavar="BUNDLE")
    d.add_argument("--trusted-keys", required=True, metavar="PATH", help="the release key(s) the parent must be "
                                                                         "signed by (a .pub or a folder of them)")
    d.add_argument("--board-pub", required=True, metavar="PUB", help="the public key of the board that derived it")
    d.add_argument("--key", metavar="KEY", help="the release key: sign a clean copy (needs --out)")
    d.add_argument("--out", metavar="DIR", help="the new folder of the signed copy")
    d.add_argument("--release", type=int, metavar="N", help="the release counter of the new signature (default: "
                                                            "the signing time in seconds)")
    args = p.parse_args(argv)
    if args.command == "derived" and (args.key is None) != (args.out is None):
        p.error("derived: --key and --out go together (the signed copy is a new folder)")
    try:
        if args.command == "keygen":
            key, pub, key_id = generate_key(args.out, args.name)
            print(f"key id {key_id}: private key {key} (mode 0600: keep it off the boards and out of bundles), "
                  f"public key {pub} (give it to the boards: trusted_keys)")
        elif args.command == "derived":
            _, lines = check_derived(args.bundle, args.trusted_keys, args.board_pub)
            print("\n".join(lines))
            if args.key is not None:
                path, key_id, bundle_id = sign_bundle(args.bundle, args.key, args.release, args.out)
                print(f"signed bundle {bundle_id} with key {key_id}, release {release_of(path.read_bytes())}: "
                      f"{path}")
        else:
            path, key_id, bundle_id = sign_bundle(args.bundle, args.key, args.release, args.out)
            print(f"signed bundle {bundle_id} with key {key_id}, release {release_of(path.read_bytes())}: {path}")
    except (BundleError, SignatureError, OSError) as exc:
        print(f"convert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
