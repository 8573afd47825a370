"""`edge-inspect export-labels`: the operators' reviewed images, as training data.

    edge-inspect export-labels --db results.sqlite3 --out DIR [--processed DIR] [--models BUNDLE]

Writes DIR/CLASS/<result id>-<file name> for every result whose latest review gives it a class (confirmed or
corrected; `unusable` is left out), the class-folder layout `python -m train prepare --data DIR` ingests, and
DIR/export_manifest.csv: one row per image with where it came from (source path, result id, review id,
sha256), the model's label and the reviewed one, who reviewed it and when, and the bundle that labelled it.

Images are read only from inside the processed folder (the same check as the review page) and must still have
the content that was inspected (sha256); any that cannot be exported are listed with the reason, the rest are
still exported (exit 1). The export is written to a temporary folder beside DIR and renamed into place, so DIR
is never left half-written; DIR must be new, empty, or an earlier export (it is replaced).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from edge_runtime.db.store import StorageError
from edge_runtime.digest import sha256_file
from edge_runtime.review.reviews import ReviewError, file_within, open_reviews

PROG = "edge-inspect export-labels"
EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2
MANIFEST = "export_manifest.csv"
FIELDS = ("file", "label", "model_label", "result_id", "review_id", "source_path", "sha256", "reviewer",
          "reviewed_at", "bundle_id")


class ExportError(ValueError):
    """The export cannot be written where asked; the message says why."""


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """An export's manifest rows keyed by the resolved path of each exported file ({} if not an export)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return {}
    with open(folder / MANIFEST, newline="", encoding="utf-8") as fh:
        return {str((folder / row["file"]).resolve()): row for row in csv.DictReader(fh)}


def check_out(out: Path) -> None:
    """DIR may be new, an empty folder, or an earlier export; anything else is refused (nothing is lost)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out} is not empty and is not an earlier export (no {MANIFEST}); "
                          "refusing to write into it: give a new or empty folder")


def export(reviews, out: str | os.PathLike) -> dict:
    """Write the export; returns {"exported": {label: n}, "skipped": [(result_id, path, reason)], "out": DIR}."""
    out = Path(out).expanduser().absolute()
    check_out(out)
    rows = reviews.for_export()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skipped, counts, lines = [], Counter(), []
    try:
        for row in rows:
            try:
                src = file_within(reviews.processed, row["dest_path"])
            except ReviewError as exc:
                skipped.append((row["result_id"], row["dest_path"], str(exc)))
                continue
            if row["sha256"] and sha256_file(src) != row["sha256"]:
                skipped.append((row["result_id"], row["dest_path"], "content differs from the inspected image "
                                "(sha256 changed since it was recorded)"))
                continue
            rel = Path(row["label"]) / f"{row['result_id']}-{src.name}"
            (tmp / rel.parent).mkdir(exist_ok=True)
            shutil.copy2(src, tmp / rel)
            counts[row["label"]] += 1
            lines.append({"file": rel.as_posix(), "label": row["label"], "model_label": row["model_label"],
                          "result_id": row["result_id"], "review_id": row["review_id"], "source_path": str(src),
                          "sha256": row["sha256"], "reviewer": row["reviewer"], "reviewed_at": row["reviewed_at"],
                          "bundle_id": row["bundle_id"] or ""})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(lines)
        with open(tmp / MANIFEST, "w", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"exported": dict(sorted(counts.items())), "skipped": skipped, "out": out}


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished export at `out`; an earlier export there is removed only once the new one is in place."""
    check_out(out)          # again: nothing may have appeared there meanwhile
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write the reviewed images in the class-folder layout "
                                                       "`python -m train prepare` ingests, with a manifest.")
    p.add_argument("--db", required=True, metavar="PATH", help="the service's SQLite result database")
    p.add_argument("--out", required=True, metavar="DIR", help="new, empty, or earlier-export folder")
    p.add_argument("--processed", metavar="DIR", help="the service's processed folder (default: 'processed' "
                                                      "beside the database)")
    p.add_argument("--models", metavar="BUNDLE", help="class list, for a database that records no bundle")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        reviews = open_reviews(args.db, args.processed, args.models)
    except (ReviewError, StorageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    try:
        if not reviews.for_export():
            print(f"{PROG}: nothing to export: no result has a confirmed or corrected review yet", file=sys.stderr)
            return EXIT_FAILED
        report = export(reviews, args.out)
    except (ExportError, StorageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except OSError as exc:
        print(f"{PROG}: error: cannot write the export: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        reviews.store.close()
    for result_id, path, reason in report["skipped"]:
        print(f"{PROG}: result {result_id}: {path}: not exported: {reason}", file=sys.stderr)
    total = sum(report["exported"].values())
    per = ", ".join(f"{k} {v}" for k, v in report["exported"].items())
    print(f"{PROG}: {total} image(s) exported to {report['out']} ({per}); {len(report['skipped'])} skipped; "
          f"manifest {report['out'] / MANIFEST}", file=sys.stderr)
    return EXIT_FAILED if report["skipped"] else EXIT_OK
