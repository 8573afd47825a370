"""Bundle signatures: Ed25519 over manifest.yaml's exact bytes (the manifest pins every file's sha256, so the
signature covers the whole bundle). The one place a signature is made, read and checked.

Files
    KEY.key          the private key (PKCS#8 PEM, mode 0600); made by `python -m convert keygen`, used by
                     `python -m convert sign`; never goes in a bundle, a log or a result
    KEY.pub          the public key (SubjectPublicKeyInfo PEM): what a board trusts (`trusted_keys:` a .pub file,
                     or a folder whose *.pub files are all trusted)
    manifest.sig     beside manifest.yaml in the bundle: JSON {"format": "sem-inspect-signature/2",
                     "algorithm": "ed25519", "key_id", "statement": {"bundle_id", "release", "signed_at"},
                     "signature": base64}. The signature is over the statement's canonical JSON (sorted keys, no
                     spaces), which names the manifest by its sha256 (the bundle id, as the runtime has it), so the
                     release counter is signed with the bundle: a board refuses a release lower than the highest
                     it accepted (a downgrade to an older signed bundle) unless an operator rolls back. key_id is
                     the first 16 hex digits of sha256(raw public key). Format 1 (the signature over
                     manifest.yaml's bytes, no statement) is still read, as release 0.
    BOARD.key/.pub   a board's own key pair (service.yaml `board_key:`, made at install): signs what the board
                     derives (`edge-inspect adapt`); the board reads only BOARD.pub, beside it, to check
    derivation.sig   in a bundle a board derived: JSON {"format": "sem-inspect-derivation/1", "algorithm",
                     "key_id" (the board key's), "statement": {"bundle_id", "parent_bundle_id", "board_key_id",
                     "derived_at"}, "signature"}, over the statement's canonical JSON as manifest.sig; beside it
                     parent.manifest.yaml and parent.sig, the signed parent's manifest and signature as they were
                     (pinned under the manifest's `files:`). verify_derivation() is the rule a board with trusted
                     keys applies to a bundle without manifest.sig (docs/security.md, "Bundles a board derives").

The `cryptography` package (the optional `signing` extra; aarch64 wheels exist) is imported only here and only
when a key is read: a board configured without trusted keys runs without it, exactly as before. The bundle
reader (edge_runtime/bundle.py) calls verify_manifest() right after reading the manifest, before any model file
is read, when it is given trusted keys.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.digest import sha256_bytes
from edge_runtime.safeopen import open_regular

SIGNATURE = "manifest.sig"
DERIVATION = "derivation.sig"
PARENT_MANIFEST = "parent.manifest.yaml"
PARENT_SIGNATURE = "parent.sig"
DERIVATION_FORMAT = "sem-inspect-derivation/1"
SIG_FORMAT = "sem-inspect-signature/2"
SIG_FORMAT_V1 = "sem-inspect-signature/1"       # signature over the manifest's bytes; release 0
ALGORITHM = "ed25519"
HINT = 'pip install "sem-inspect[signing]"'
MAX_KEY_BYTES = 16 * 1024
MAX_SIG_BYTES = 4096
PRIVATE_MARKERS = (b"PRIVATE KEY-----",)       # any PEM private key (PKCS#8, OpenSSH, RSA, EC)


class SignatureError(ValueError):
    """A key or a signature that cannot be used; the message names the file and says why (one line)."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError(f"bundle signatures need the cryptography package: {HINT}") from None
    return serialization, ed25519, InvalidSignature


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        fh, st = open_regular(path)
        with fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise SignatureError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise SignatureError(f"{path}: not a {what} (over {limit} bytes)")
    return data


def key_id_of(raw_public: bytes) -> str:
    return sha256_bytes(raw_public)[:16]


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    path: str
    key: object          # cryptography's Ed25519PublicKey


class TrustedKeys:
    """The public keys a board trusts, by key id."""

    def __init__(self, keys: list[PublicKey], source: str):
        self.by_id = {k.key_id: k for k in keys}
        self.source = source

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def describe(self) -> str:
        return f"{len(self.by_id)} trusted key(s) from {self.source} ({', '.join(sorted(self.by_id))})"


def read_public_key(path: str | os.PathLike) -> PublicKey:
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    data = _read_small(path, MAX_KEY_BYTES, "public key")
    if any(m in data for m in PRIVATE_MARKERS):
        raise SignatureError(f"{path}: this is a private key; a board needs only the public one (KEY.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{path}: not a PEM public key (make one with `python -m convert keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(key_id_of(raw), str(path), key)


def load_trusted_keys(source: str | os.PathLike) -> TrustedKeys:
    """A .pub file, or a folder whose *.pub files are all trusted (at least one)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.name.endswith(".pub") and not p.name.startswith("."))
        if not files:
            raise SignatureError(f"{source}: no *.pub public key in this folder (trusted_keys)")
    elif source.exists():
        files = [source]
    else:
        raise SignatureError(f"{source}: trusted_keys does not exist")
    return TrustedKeys([read_public_key(f) for f in files], str(source))


def trusted(keys: "TrustedKeys | str | os.PathLike | None") -> TrustedKeys | None:
    """TrustedKeys, a path to load them from, or None (no signature required)."""
    if keys is None or isinstance(keys, TrustedKeys):
        return keys
    return load_trusted_keys(keys)


def parse_signature(data: bytes, where: str) -> dict:
    """manifest.sig's fields, checked (SignatureError otherwise)."""
    try:
        sig = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureError(f"{where}: not a signature file (JSON expected)") from None
    if not isinstance(sig, dict) or sig.get("format") not in (SIG_FORMAT, SIG_FORMAT_V1) \
            or sig.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{where}: not a {SIG_FORMAT} {ALGORITHM} signature")
    for key in ("key_id", "signature"):
        if not isinstance(sig.get(key), str):
            raise SignatureError(f"{where}: {key} missing")
    if sig["format"] == SIG_FORMAT:
        st = sig.get("statement")
        if not isinstance(st, dict) or set(st) != {"bundle_id", "release", "signed_at"} \
                or not isinstance(st["bundle_id"], str) or not isinstance(st["signed_at"], str) \
                or isinstance(st["release"], bool) or not isinstance(st["release"], int) \
                or not 0 <= st["release"] < 2 ** 63:
            raise SignatureError(f"{where}: statement must hold bundle_id, release (an integer >= 0), signed_at")
    try:
        sig["raw"] = base64.b64decode(sig["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature is not base64") from None
    return sig


def verify_manifest(manifest: bytes, signature: bytes | None, keys: TrustedKeys, where: str) -> str:
    """Check manifest.yaml's bytes against manifest.sig's bytes (None: there is none) with the trusted keys.
    Returns the key id that signed it; SignatureError with one line saying why not."""
    if signature is None:
        raise SignatureError(f"{where}: unsigned bundle (no {SIGNATURE}), and this board accepts only bundles "
                             f"signed by {keys.describe()}")
    sig = parse_signature(signature, f"{where}/{SIGNATURE}")
    key = keys.by_id.get(sig["key_id"])
    if key is None:
        raise SignatureError(f"{where}: signed by key {sig['key_id']!r}, which is not among the {keys.describe()}")
    _, _, invalid = _crypto()
    try:
        if sig["format"] == SIG_FORMAT:
            key.key.verify(sig["raw"], canonical(sig["statement"]))
            if sig["statement"]["bundle_id"] != sha256_bytes(manifest):
                raise invalid()
        else:
            key.key.verify(sig["raw"], manifest)
    except invalid:
        raise SignatureError(f"{where}: the signature of key {sig['key_id']} does not match manifest.yaml: the "
                             "bundle was altered after it was signed, or the signature belongs to another bundle") \
            from None
    return sig["key_id"]


# ---- bundles a board derives ------------------------------------------------------------------------------
def board_public_key(board_key: "PublicKey | str | os.PathLike") -> PublicKey:
    """The board's own public key: BOARD.pub beside the private key `board_key` names (or that .pub itself)."""
    if isinstance(board_key, PublicKey):
        return board_key
    path = Path(board_key)
    return read_public_key(path if path.suffix == ".pub" else path.with_suffix(".pub"))


@dataclass(frozen=True)
class Derivation:
    """A derivation that verify_derivation() accepted."""
    board_key_id: str           # the board key that derived the bundle (this board's own)
    parent_id: str              # the signed parent's bundle id (sha256 of parent.manifest.yaml)
    parent_key_id: str          # the trusted key that signed the parent
    parent_release: int         # the parent's release counter: the derived bundle's release
    parent_manifest: bytes


def derivation_for(manifest: bytes, parent_manifest: bytes, board_key: str | os.PathLike) -> bytes:
    """derivation.sig's bytes: the board key's signature over a statement naming the derived manifest and its
    signed parent's manifest by their sha256."""
    import datetime as _dt
    serialization, _, _ = _crypto()
    private = _private_key(Path(board_key))
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    statement = {"bundle_id": sha256_bytes(manifest), "parent_bundle_id": sha256_bytes(parent_manifest),
                 "board_key_id": key_id_of(raw),
                 "derived_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    doc = {"format": DERIVATION_FORMAT, "algorithm": ALGORITHM, "key_id": key_id_of(raw), "statement": statement,
           "signature": base64.b64encode(private.sign(canonical(statement))).decode("ascii")}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def parse_derivation(data: bytes, where: str) -> dict:
    """derivation.sig's fields, checked (SignatureError otherwise)."""
    try:
        sig = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureError(f"{where}: not a derivation signature (JSON expected)") from None
    if not isinstance(sig, dict) or sig.get("format") != DERIVATION_FORMAT or sig.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{where}: not a {DERIVATION_FORMAT} {ALGORITHM} signature")
    st = sig.get("statement")
    names = ("bundle_id", "parent_bundle_id", "board_key_id", "derived_at")
    if not isinstance(sig.get("key_id"), str) or not isinstance(sig.get("signature"), str) \
            or not isinstance(st, dict) or set(st) != set(names) \
            or not all(isinstance(st[k], str) for k in names) or st["board_key_id"] != sig["key_id"]:
        raise SignatureError(f"{where}: statement must hold {', '.join(names)} (board_key_id = key_id)")
    try:
        sig["raw"] = base64.b64decode(sig["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature is not base64") from None
    return sig


def verify_derivation(manifest: bytes, derivation: bytes | None, parent_manifest: bytes | None,
                      parent_signature: bytes | None, keys: TrustedKeys, own: "PublicKey | str | os.PathLike | None",
                      where: str) -> Derivation:
    """A bundle without manifest.sig, on a board with trusted keys: accepted only as a derivation this board
    signed (`own`: its board key) of a parent a trusted key signed. Returns the Derivation; SignatureError with
    one line saying why not. The caller checks that the backbones are the parent's (edge_runtime/bundle.py)."""
    if derivation is None:
        raise SignatureError(f"{where}: unsigned bundle (no {SIGNATURE}, no {DERIVATION}), and this board accepts "
                             f"only bundles signed by {keys.describe()}")
    sig = parse_derivation(derivation, f"{where}/{DERIVATION}")
    st = sig["statement"]
    if own is None:
        raise SignatureError(f"{where}: adapted bundle derived by board key {sig['key_id']}, and this board has no "
                             f"board_key to check a derivation with; it accepts only bundles signed by "
                             f"{keys.describe()}")
    own = board_public_key(own)
    if sig["key_id"] != own.key_id:
        raise SignatureError(f"{where}: adapted bundle derived by another board's key {sig['key_id']} (this board's "
                             f"key is {own.key_id}); run it elsewhere only once the release key signs it")
    _, _, invalid = _crypto()
    try:
        own.key.verify(sig["raw"], canonical(st))
        if st["bundle_id"] != sha256_bytes(manifest):
            raise invalid()
    except invalid:
        raise SignatureError(f"{where}: the derivation signature of board key {sig['key_id']} does not match "
                             "manifest.yaml: the bundle was altered after it was derived") from None
    parent = st["parent_bundle_id"]
    if parent_manifest is None or sha256_bytes(parent_manifest) != parent:
        raise SignatureError(f"{where}: adapted bundle: {PARENT_MANIFEST} is missing or is not its parent "
                             f"{parent[:16]}'s manifest")
    if parent_signature is None:
        raise SignatureError(f"{where}: adapted bundle: its parent {parent[:16]} is not signed by a trusted key "
                             f"(no {PARENT_SIGNATURE}), and this board accepts only bundles signed by "
                             f"{keys.describe()}")
    try:
        parent_key = verify_manifest(parent_manifest, parent_signature, keys, PARENT_SIGNATURE)
    except SignatureError as exc:
        raise SignatureError(f"{where}: adapted bundle: its parent {parent[:16]} is not signed by a trusted key "
                             f"({exc})") from None
    return Derivation(own.key_id, parent, parent_key, release_of(parent_signature), parent_manifest)


# ---- signing (the training machine) ----------------------------------------------------------------------
def generate_key(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path, str]:
    """Write OUT/NAME.key (private, 0600, created new) and OUT/NAME.pub. Returns (key, pub, key id)."""
    serialization, ed25519, _ = _crypto()
    if not name or Path(name).name != name or name.startswith("."):
        raise SignatureError(f"--name {name!r} must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise SignatureError(f"{p} exists: refusing to overwrite a key")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_path, pub_path, key_id_of(raw)


def _private_key(path: Path):
    serialization, ed25519, _ = _crypto()
    data = _read_small(path, MAX_KEY_BYTES, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SignatureError(f"{path}: not an unencrypted PEM private key (make one with `python -m convert "
                             "keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def canonical(statement: dict) -> bytes:
    """The bytes a statement is signed as: JSON with sorted keys and no spaces."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def release_of(signature: bytes | None) -> int:
    """The release counter a signature file states (0 for none, or a format-1 signature). Read it only from a
    signature that verify_manifest() accepted."""
    if signature is None:
        return 0
    sig = parse_signature(signature, SIGNATURE)
    return sig["statement"]["release"] if sig["format"] == SIG_FORMAT else 0


def default_release() -> int:
    """A release counter that grows without any state kept: the signing time in whole seconds (UTC)."""
    import time
    return int(time.time())


def signature_for(manifest: bytes, key_path: str | os.PathLike, release: int | None = None) -> bytes:
    """manifest.sig's bytes for these manifest bytes, signed with the private key at key_path, stating
    `release` (default: default_release())."""
    import datetime as _dt
    serialization, _, _ = _crypto()
    private = _private_key(Path(key_path))
    if release is None:
        release = default_release()
    if isinstance(release, bool) or not isinstance(release, int) or not 0 <= release < 2 ** 63:
        raise SignatureError(f"release {release!r} must be an integer >= 0")
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    statement = {"bundle_id": sha256_bytes(manifest), "release": release,
                 "signed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    doc = {"format": SIG_FORMAT, "algorithm": ALGORITHM, "key_id": key_id_of(raw), "statement": statement,
           "signature": base64.b64encode(private.sign(canonical(statement))).decode("ascii")}
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def holds_private_key(path: Path) -> bool:
    """Whether a file holds a PEM private key anywhere in it (never allowed inside a bundle): read whole, in
    chunks that overlap by a marker's length so a marker across two chunks is still found."""
    keep = max(len(m) for m in PRIVATE_MARKERS) - 1
    try:
        fh, _ = open_regular(path)
        with fh:
            tail = b""
            while chunk := fh.read(1 << 20):
                window = tail + chunk
                if any(m in window for m in PRIVATE_MARKERS):
                    return True
                tail = window[-keep:]
    except OSError:
        return False
    return False
