"""`edge-inspect adapt`: refit the bundle's heads on the images the operators reviewed, on the board.

    edge-inspect adapt --config /etc/sem-inspect/service.yaml --out /opt/sem-inspect/models/fab-1
                       [--models BUNDLE] [--fab-weight W] [--folds 5] [--threads N] [--board-key FILE]
    edge-inspect adapt --db results.sqlite3 [--processed DIR] --out ... (instead of --config)

The reviewed images are those `edge-inspect export-labels` would export (latest review gives a class;
`unusable` left out), read from inside the processed folder and only while their content is the one that was
inspected (sha256). Copies of one image whose reviews disagree are left out (edge_runtime/review/conflicts.py)
and named, by result id, in the summary and adapt_report.json (`conflicts_left_out`); the rest are used.
--models defaults to the bundle that recorded the latest result. --board-key (default: the config's board_key)
signs the new bundle as this board's derivation, so a board with trusted_keys runs it (docs/security.md,
"Bundles a board derives"). numpy and the TFLite interpreter only: no
TensorFlow. Exit 0 written; 2 a problem a person must fix (nothing reviewed yet, a bundle without a replay set,
unknown labels, one class only, ...), nothing written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_runtime.adapt.refit import FOLDS, AdaptError
from edge_runtime.adapt.run import adapt, summary
from edge_runtime.bundle import BundleError
from edge_runtime.command import CommandError, add_log_level, reported, run_command
from edge_runtime.db.store import StorageError
from edge_runtime.digest import sha256_bytes
from edge_runtime.exits import EXIT_OK
from edge_runtime.interpreter import NoInterpreter
from edge_runtime.review.reviews import (ReviewError, add_database_flags, database_paths, open_reviews,
                                         reviewed_images)
from edge_runtime.signing import SignatureError

PROG = "edge-inspect adapt"
# Beside the result database: each reviewed image's features, kept by content sha256 (edge_runtime/adapt/cache.py)
CACHE_FOLDER = "adapt-cache"


def labelled_images(reviews) -> tuple[list[tuple[bytes, str, str, str]], list[tuple[int, str, str]], str | None]:
    """(image bytes, reviewed label, sha256, "result ID") of each usable reviewed image (the rule export-labels
    follows: review/reviews.py reviewed_images, each file opened once inside processed/ and checked), the ones
    left out with why, and the path of the bundle that recorded the latest result."""
    items, skipped = [], []
    for row, fh, _st, problem in reviewed_images(reviews):
        if problem is not None:
            skipped.append((row["result_id"], row["dest_path"], problem))
            continue
        data = fh.read()
        items.append((data, row["label"], sha256_bytes(data), f"result {row['result_id']}"))
    return items, skipped, reviews.store.latest_bundle_path()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Refit the bundle's heads on the operators' reviews "
                                                       "and write a new bundle (numpy only, seconds).")
    add_database_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where the new bundle goes (new or empty folder)")
    p.add_argument("--models", metavar="BUNDLE", help="bundle to adapt (default: the one that recorded the latest "
                                                      "result)")
    p.add_argument("--fab-weight", type=float, help="weight of the fab's images over the replay set (default: "
                                                     "the best of 4, 10, 30 out of fold)")
    p.add_argument("--folds", type=int, default=FOLDS, help=f"cross-validation folds (default {FOLDS})")
    p.add_argument("--threads", type=int, help="interpreter threads (default: all cores)")
    p.add_argument("--board-key", metavar="FILE", help="this board's private key: sign the new bundle as derived "
                                                       "here (default: the --config's board_key; unset: unsigned)")
    add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), adapt_on_reviews, argv, log_format="%(message)s")


def echo(msg: str) -> None:
    print(f"{PROG}: {msg}" if not msg.startswith("adapt") else msg, file=sys.stderr)


def board_key_of(args: argparse.Namespace) -> str | None:
    """--board-key, else the service config's board_key (--config)."""
    if args.board_key is not None or args.config is None:
        return args.board_key
    from edge_runtime.config.service_config import load_service_config
    return load_service_config(args.config).board_key      # already checked by database_paths


def adapt_on_reviews(args: argparse.Namespace) -> int:
    if (args.fab_weight is not None and args.fab_weight <= 0) or args.folds < 2:
        raise CommandError("--fab-weight must be > 0 and --folds >= 2")
    with reported(ReviewError, StorageError):
        db, processed = database_paths(args)
        reviews = open_reviews(db, processed, args.models)
    board_key = board_key_of(args)
    try:
        items, skipped, recorded_by = labelled_images(reviews)
    finally:
        reviews.store.close()
    for result_id, path, reason in skipped:
        echo(f"result {result_id}: {path}: left out: {reason}")
    if not items:
        raise CommandError("nothing to adapt on: no result has a usable confirmed or corrected review yet")
    models = args.models or recorded_by
    if not models:
        raise CommandError("the database records no bundle: give the bundle to adapt with --models BUNDLE")
    try:
        with reported(AdaptError, BundleError, NoInterpreter, SignatureError):
            report = adapt(models, items, args.out, fab_weight=args.fab_weight, folds=args.folds,
                           threads=args.threads, source=f"reviews in {Path(db).resolve()}", echo=echo,
                           board_key=board_key, cache_dir=Path(db).resolve().parent / CACHE_FOLDER)
    except OSError as exc:
        raise CommandError(f"cannot write the new bundle: {exc.strerror or exc}") from exc
    print(summary(report), file=sys.stderr)
    if report["conflicts_left_out"]["conflicts"]:
        echo("settle the images left out on the review page (edge-inspect review: 'Reviews that disagree'): "
             "review one copy again so the labels agree, and adapt again")
    return EXIT_OK
