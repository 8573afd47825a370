"""The central side of a rollout: pack a signed bundle, publish it to chosen boards, roll them back, show the fleet.

    python -m central.rollout pack models/NEW --out /srv/bundles/        -> /srv/bundles/<id16>.tar
    python -m central.rollout publish --broker HOST:PORT --boards sem-tool-07,sem-tool-08 \\
        --archive /srv/bundles/<id16>.tar --url https://files.fab.local/bundles/<id16>.tar \\
        [--shadow-images 200 --shadow-minutes 60 --fraction 1.0] \\
        [--min-agreement 0.95 --min-stage1-agreement 0.95 --max-error-rate 0]
    python -m central.rollout rollback --broker HOST:PORT --boards sem-tool-07 [--bundle-id ID]
    python -m central.rollout status --db /srv/fab/inspections.sqlite3

`pack` checks the bundle (every file's sha256) and that it is signed (manifest.sig), and writes an uncompressed
tar of its files. Serve the folder over HTTP(S) with any web server. `publish` reads the archive (its sha256 and
size; the manifest inside gives the bundle id, manifest.sig the signature) and publishes one retained QoS-1
message per board on PREFIX/BOARD/rollout (the format: edge_runtime/fleet/rollout_message.py); each board then
fetches, verifies against its trusted keys, shadows and promotes or keeps its bundle
(edge_runtime/service/rollout.py) and reports on its status topic. `status` prints what the collector stored
from those reports (fleet_bundle_state). Options for the broker as for the collector: --prefix, --username with
--password-file, --tls with --ca. Exit 0 ok, 2 bad input, 1 the broker did not acknowledge.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path

from central.options import add_broker_flags, add_db_flag, broker_settings
from central.storage import StorageError, open_storage
from edge_runtime.bundle import MANIFEST, BundleError, load_bundle, read_signature
from edge_runtime.command import add_log_level, reported, run_command
from edge_runtime.netnames import is_board_name
from edge_runtime.exits import utc_now
from edge_runtime.digest import CHUNK
from edge_runtime.exits import EXIT_FAILED, EXIT_OK
from edge_runtime.fleet import rollout_message
from edge_runtime.fleet.mqtt import connect, new_client
from edge_runtime.extras import MissingExtra
from edge_runtime.signing import SIGNATURE, SignatureError, parse_signature


class RolloutError(ValueError):
    """Bad input to a rollout command; the message says why."""


# ---- pack ----------------------------------------------------------------------------------------------
def pack(bundle: str | Path, out_dir: str | Path) -> tuple[Path, dict]:
    """OUT/<bundle_id[:16]>.tar holding the bundle's files (manifest, its signature and every file it pins)."""
    try:
        b = load_bundle(bundle)
    except BundleError as exc:
        raise RolloutError(str(exc)) from None
    if read_signature(b.root) is None:
        raise RolloutError(f"{b.root}: not signed (no {SIGNATURE}); sign it first: python -m convert sign "
                           f"{b.root} --key KEY")
    names = [MANIFEST, SIGNATURE] + b.files()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{b.bundle_id[:16]}.tar"
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            f = b.root / name
            info = tar.gettarinfo(str(f), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(path)
    return path, describe(path)


def describe(archive: str | Path) -> dict:
    """bundle_id, sha256, bytes and signature of an archive made by pack."""
    archive = Path(archive)
    digest, size = hashlib.sha256(), 0
    with open(archive, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    try:
        with tarfile.open(archive, "r:") as tar:
            manifest = tar.extractfile(MANIFEST).read()
            sig = tar.extractfile(SIGNATURE).read()
    except (tarfile.TarError, KeyError, AttributeError) as exc:
        raise RolloutError(f"{archive}: not a bundle archive with {MANIFEST} and {SIGNATURE} ({exc})") from None
    try:
        fields = parse_signature(sig, f"{archive}:{SIGNATURE}")
    except SignatureError as exc:
        raise RolloutError(str(exc)) from None
    return {"bundle_id": hashlib.sha256(manifest).hexdigest(), "sha256": digest.hexdigest(), "bytes": size,
            "signature": {k: fields[k] for k in ("format", "algorithm", "key_id", "signature", "statement")
                          if k in fields}}


# ---- messages ------------------------------------------------------------------------------------------
def rollout_doc(desc: dict, url: str, rollout_id: str, shadow: dict, bounds: dict) -> dict:
    doc = {"action": "rollout", "id": rollout_id, "url": url, **desc, "shadow": shadow, "bounds": bounds,
           "at": utc_now()}
    rollout_message.parse(json.dumps(doc).encode())     # what a board accepts, checked before it is sent
    return doc


def rollback_doc(rollout_id: str, bundle_id: str | None) -> dict:
    doc = {"action": "rollback", "id": rollout_id, "bundle_id": bundle_id, "at": utc_now()}
    rollout_message.parse(json.dumps(doc).encode())
    return doc


def send(args, docs: dict[str, dict]) -> int:
    """Publish {board: message} retained with QoS 1; returns 0 once the broker acknowledged every one."""
    broker = broker_settings(args)
    client = new_client(broker, f"sem-inspect-rollout-{int(time.time())}", needed_by="rollout", extra="central")
    connect(client, broker, wait=True)
    client.loop_start()
    try:
        infos = {board: client.publish(rollout_message.topic(args.prefix, board), json.dumps(doc).encode(), qos=1,
                                       retain=True) for board, doc in docs.items()}
        failed = []
        for board, info in infos.items():
            try:
                info.wait_for_publish(30)
            except (RuntimeError, ValueError):
                pass
            (print if info.is_published() else failed.append)(f"{board}: {docs[board]['action']} "
                                                              f"{docs[board]['id']} published")
        for board in failed:
            print(f"{board}: not acknowledged by the broker", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        client.disconnect()
        client.loop_stop()


def fleet_state(db: str) -> list[dict]:
    """The collector's fleet_bundle_state rows (what each board last reported)."""
    storage = open_storage(db)
    try:
        return storage.bundle_states()
    finally:
        storage.close()


# ---- command line --------------------------------------------------------------------------------------
def _boards(text: str) -> list[str]:
    boards = [b for b in text.split(",") if b]
    bad = [b for b in boards if not is_board_name(b)]
    if not boards or bad:
        raise argparse.ArgumentTypeError(f"board names, comma-separated (bad: {', '.join(bad) or 'none given'})")
    return boards


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m central.rollout", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="a signed bundle -> OUT/<id16>.tar")
    pk.add_argument("bundle")
    pk.add_argument("--out", required=True, type=Path)
    add_log_level(pk)
    broker = argparse.ArgumentParser(add_help=False)
    add_broker_flags(broker)
    broker.add_argument("--boards", required=True, type=_boards, help="comma-separated board names")
    broker.add_argument("--id", help="the rollout's id (default: r-<time>)")
    add_log_level(broker)
    pub = sub.add_parser("publish", parents=[broker], help="roll a packed bundle out to boards")
    pub.add_argument("--archive", required=True, type=Path)
    pub.add_argument("--url", required=True, help="where the boards fetch the archive (http:// or https://)")
    d, b = rollout_message.DEFAULT_SHADOW, rollout_message.DEFAULT_BOUNDS
    pub.add_argument("--shadow-images", type=int, default=d["images"], help=f"default {d['images']}")
    pub.add_argument("--shadow-minutes", type=float, default=d["minutes"], help=f"default {d['minutes']:g}")
    pub.add_argument("--fraction", type=float, default=d["fraction"], help="of the images the candidate inspects")
    for key in b:
        pub.add_argument("--" + key.replace("_", "-"), type=float, default=b[key], help=f"default {b[key]:g}")
    rb = sub.add_parser("rollback", parents=[broker], help="return boards to their previous bundle")
    rb.add_argument("--bundle-id", help="a specific earlier bundle the boards still keep (default: the previous)")
    st = sub.add_parser("status", help="the fleet's bundles, from the collector's database")
    add_db_flag(st)
    st.add_argument("--json", action="store_true")
    add_log_level(st)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda args: f"rollout {args.command}", build_parser(), run_subcommand, argv)


def run_subcommand(args: argparse.Namespace) -> int:
    with reported(RolloutError, rollout_message.MessageError, MissingExtra, OSError, ValueError, StorageError):
        if args.command == "pack":
            path, desc = pack(args.bundle, args.out)
            print(json.dumps({"archive": str(path), **desc}, indent=1))
            return EXIT_OK
        if args.command == "status":
            show_status(fleet_state(args.db), as_json=args.json)
            return EXIT_OK
        rid = args.id or f"r-{time.strftime('%Y%m%dT%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"
        if args.command == "publish":
            doc = rollout_doc(describe(args.archive), args.url, rid,
                              {"images": args.shadow_images, "minutes": args.shadow_minutes,
                               "fraction": args.fraction},
                              {k: getattr(args, k) for k in rollout_message.DEFAULT_BOUNDS})
        else:
            doc = rollback_doc(rid, args.bundle_id)
        return send(args, {board: doc for board in args.boards})


def show_status(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        agreement = "" if r["agreement"] is None else f" agreement {r['agreement']:.3f} ({r['shadow_images']})"
        print(f"{r['board']}: current {r['current'][:16]} candidate {(r['candidate'] or '-')[:16]} "
              f"{r['phase'] or ''}{agreement}; last change {r['last_change_at'] or '-'} {r['last_change'] or ''}")


if __name__ == "__main__":
    sys.exit(main())
