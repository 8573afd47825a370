"""`edge-inspect adapt`: refit the bundle's heads on the images the operators reviewed, on the board.

    edge-inspect adapt --db results.sqlite3 --out /opt/sem-inspect/models/fab-1 [--models BUNDLE]
                       [--processed DIR] [--fab-weight W] [--folds 5] [--threads N]

The reviewed images are those `edge-inspect export-labels` would export (latest review gives a class;
`unusable` left out), read from inside the processed folder and only while their content is the one that was
inspected (sha256). --models defaults to the bundle that recorded the latest result. numpy and the TFLite
interpreter only: no TensorFlow. Exit 0 written; 2 a problem a person must fix (nothing reviewed yet,
a bundle without a replay set, unknown labels, one class only, ...), nothing written.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_runtime.adapt.refit import FOLDS, AdaptError
from edge_runtime.adapt.run import adapt, summary
from edge_runtime.bundle import BundleError
from edge_runtime.db.store import StorageError
from edge_runtime.digest import sha256_bytes
from edge_runtime.interpreter import NoInterpreter
from edge_runtime.review.reviews import ReviewError, open_reviews, reviewed_images

PROG = "edge-inspect adapt"
EXIT_OK, EXIT_SETUP = 0, 2


def labelled_images(reviews) -> tuple[list[tuple[bytes, str, str]], list[tuple[int, str, str]], str | None]:
    """(image bytes, reviewed label, sha256) of each usable reviewed image (the rule export-labels follows:
    review/reviews.py reviewed_images, each file opened once inside processed/ and checked), the ones left out
    with why, and the path of the bundle that recorded the latest result."""
    items, skipped = [], []
    for row, fh, _st, problem in reviewed_images(reviews):
        if problem is not None:
            skipped.append((row["result_id"], row["dest_path"], problem))
            continue
        data = fh.read()
        items.append((data, row["label"], sha256_bytes(data)))
    return items, skipped, reviews.store.latest_bundle_path()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Refit the bundle's heads on the operators' reviews "
                                                       "and write a new bundle (numpy only, seconds).")
    p.add_argument("--db", required=True, metavar="PATH", help="the service's SQLite result database")
    p.add_argument("--out", required=True, metavar="DIR", help="where the new bundle goes (new or empty folder)")
    p.add_argument("--models", metavar="BUNDLE", help="bundle to adapt (default: the one that recorded the latest "
                                                      "result)")
    p.add_argument("--processed", metavar="DIR", help="the service's processed folder (default: 'processed' "
                                                      "beside the database)")
    p.add_argument("--fab-weight", type=float, help="weight of the fab's images over the replay set (default: "
                                                     "the best of 4, 10, 30 out of fold)")
    p.add_argument("--folds", type=int, default=FOLDS, help=f"cross-validation folds (default {FOLDS})")
    p.add_argument("--threads", type=int, help="interpreter threads (default: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def echo(msg):
        print(f"{PROG}: {msg}" if not msg.startswith("adapt") else msg, file=sys.stderr)

    if (args.fab_weight is not None and args.fab_weight <= 0) or args.folds < 2:
        echo("error: --fab-weight must be > 0 and --folds >= 2")
        return EXIT_SETUP
    try:
        reviews = open_reviews(args.db, args.processed, args.models)
    except (ReviewError, StorageError) as exc:
        echo(f"error: {exc}")
        return EXIT_SETUP
    try:
        items, skipped, recorded_by = labelled_images(reviews)
    finally:
        reviews.store.close()
    for result_id, path, reason in skipped:
        echo(f"result {result_id}: {path}: left out: {reason}")
    if not items:
        echo("error: nothing to adapt on: no result has a usable confirmed or corrected review yet")
        return EXIT_SETUP
    models = args.models or recorded_by
    if not models:
        echo("error: the database records no bundle: give the bundle to adapt with --models BUNDLE")
        return EXIT_SETUP
    try:
        report = adapt(models, items, args.out, fab_weight=args.fab_weight, folds=args.folds, threads=args.threads,
                       source=f"reviews in {Path(args.db).resolve()}", echo=echo)
    except (AdaptError, BundleError, NoInterpreter) as exc:
        echo(f"error: {exc}")
        return EXIT_SETUP
    except OSError as exc:
        echo(f"error: cannot write the new bundle: {exc.strerror or exc}")
        return EXIT_SETUP
    print(summary(report), file=sys.stderr)
    return EXIT_OK
