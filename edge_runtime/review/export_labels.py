"""`edge-inspect export-labels`: the operators' reviewed images, as training data.

    edge-inspect export-labels --config /etc/sem-inspect/service.yaml --out DIR [--models BUNDLE]
    edge-inspect export-labels --db results.sqlite3 --out DIR [--processed DIR] [--models BUNDLE]

Writes DIR/CLASS/<result id>-<file name> for every result whose latest review gives it a class (confirmed or
corrected; `unusable` is left out), the class-folder layout `python -m train prepare --data DIR` ingests, and
DIR/export_manifest.csv: one row per image with where it came from (source path, result id, review id,
sha256), the model's label and the reviewed one, who reviewed it and when, and the bundle that labelled it.

Images are read only from inside the processed folder, opened once without following symbolic links (the same
check as the review page), and must still have the content that was inspected (sha256). Every path written
stays inside DIR: a reviewed label must be a class name (edge_runtime/classnames.py), the file name is one plain
component, files are created new and never through a link. Images that cannot be exported (outside processed/,
changed, a label that is not a class name, a name too long) are listed with the reason, the rest are still
exported (exit 1). Copies of one image (the same recorded sha256) whose reviews give different classes are
left out too, all of them, and listed with their result ids until an operator reviews one again so the labels
agree (edge_runtime/review/conflicts.py; exit 1). The export is written to a new temporary folder beside DIR and
renamed into place, so DIR is never left half-written and a failed export leaves nothing; DIR must be new,
empty, or an earlier export (it is replaced).

Spreadsheets: a manifest cell starting with = + - @, a tab or a carriage return (a formula) is written with a
leading apostrophe, so opening the manifest in a spreadsheet shows it as text and runs nothing.
"""
from __future__ import annotations

import argparse
import csv
import errno
import io
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath

from edge_runtime.command import add_log_level, reported, run_command
from edge_runtime.db.store import StorageError
from edge_runtime.exits import EXIT_FAILED, EXIT_OK
from edge_runtime.review.conflicts import describe
from edge_runtime.review.reviews import (ReviewError, add_database_flags, database_paths, open_reviews,
                                         reviewed_images, split_reviewed)

PROG = "edge-inspect export-labels"
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


def _cell(value):
    """A manifest cell that a spreadsheet will not run: text starting with = + - @, a tab or a carriage return
    (a formula, e.g. a reviewer named =HYPERLINK(...)) gets a leading apostrophe, which spreadsheets show as
    text (the OWASP CSV-injection rule). Numbers and other text are written as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _inside(root: Path, label: str, name: str) -> Path:
    """root/label/name, checked to be exactly two plain components below root (never above it, never absolute)."""
    for part in (label, name):
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise ExportError(f"{part!r} cannot be a file or folder name inside --out")
    path = root / label / name
    if path.parent.parent != root or os.path.commonpath([root, path]) != str(root):
        raise ExportError(f"{label}/{name} would be written outside --out")
    return path


def _copy(fh, st: os.stat_result, dest: Path) -> None:
    """Copy an open image into a new file (never through a link, never over an existing file), keeping its
    modification time."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(fh, out, 1 << 20)
        out.flush()
        os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))


def export(reviews, out: str | os.PathLike) -> dict:
    """Write the export; returns {"exported": {label: n}, "skipped": [(result_id, path, reason)],
    "conflicts": {sha256: [(result_id, label), ...]} (left out: their reviews disagree), "out": DIR}."""
    out = Path(out).expanduser().absolute()
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    skipped, counts, lines = [], Counter(), []
    try:
        rows, conflicts = split_reviewed(reviews.for_export())
        for row, fh, st, problem in reviewed_images(reviews, rows):
            name = f"{row['result_id']}-{PurePosixPath(row['dest_path']).name}"
            if problem is None:
                try:
                    label = row["label"]
                    dest = _inside(tmp, label, name)
                except ExportError as exc:
                    problem = str(exc)
            if problem is not None:
                skipped.append((row["result_id"], row["dest_path"], problem))
                continue
            dest.parent.mkdir(exist_ok=True)
            try:
                _copy(fh, st, dest)
            except (ValueError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EEXIST):
                    raise               # disk full, I/O error: the export fails whole
                skipped.append((row["result_id"], row["dest_path"], f"cannot be written as {label}/{name!r}: "
                                f"{getattr(exc, 'strerror', None) or exc}"))
                continue
            counts[label] += 1
            rel = dest.relative_to(tmp)
            lines.append({"file": rel.as_posix(), "label": label, "model_label": row["model_label"],
                          "result_id": row["result_id"], "review_id": row["review_id"],
                          "source_path": row["dest_path"], "sha256": row["sha256"], "reviewer": row["reviewer"],
                          "reviewed_at": row["reviewed_at"], "bundle_id": row["bundle_id"] or ""})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in line.items()} for line in lines)
        fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())        # mkdtemp made it 0700; the export is an ordinary folder
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"exported": dict(sorted(counts.items())), "skipped": skipped, "conflicts": conflicts, "out": out}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished export at `out`; an earlier export there is removed only once the new one is in place
    (and put back if the new one cannot be moved in)."""
    check_out(out)          # again: nothing may have appeared there meanwhile
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        else:
            out.rmdir()
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Write the reviewed images in the class-folder layout "
                                                       "`python -m train prepare` ingests, with a manifest.")
    add_database_flags(p)
    p.add_argument("--out", required=True, metavar="DIR", help="new, empty, or earlier-export folder")
    p.add_argument("--models", metavar="BUNDLE", help="class list, for a database that records no bundle")
    add_log_level(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, build_parser(), export_reviewed, argv)


def export_reviewed(args: argparse.Namespace) -> int:
    with reported(ReviewError, StorageError):
        reviews = open_reviews(*database_paths(args), args.models)
    try:
        with reported(ExportError, StorageError), reported(OSError, prefix="cannot write the export: "):
            if not reviews.for_export():
                print(f"{PROG}: nothing to export: no result has a confirmed or corrected review yet",
                      file=sys.stderr)
                return EXIT_FAILED
            report = export(reviews, args.out)
    finally:
        reviews.store.close()
    for result_id, path, reason in report["skipped"]:
        print(f"{PROG}: result {result_id}: {path}: not exported: {reason}", file=sys.stderr)
    conflicts = report["conflicts"]
    for digest, seen in conflicts.items():
        ids = ", ".join(str(result_id) for result_id, _ in seen)
        print(f"{PROG}: results {ids}: not exported: {describe(digest, seen, lambda i: f'result {i}')}; "
              "review one of them again so the labels agree", file=sys.stderr)
    total = sum(report["exported"].values())
    per = ", ".join(f"{k} {v}" for k, v in report["exported"].items())
    disagree = (f"{sum(len(seen) for seen in conflicts.values())} left out, their reviews disagree "
                f"({len(conflicts)} conflict(s)); ") if conflicts else ""
    print(f"{PROG}: {total} image(s) exported to {report['out']} ({per}); {len(report['skipped'])} skipped; "
          f"{disagree}manifest {report['out'] / MANIFEST}", file=sys.stderr)
    return EXIT_FAILED if report["skipped"] or conflicts else EXIT_OK
