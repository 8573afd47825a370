"""python -m train prepare --data DIR [--data DIR2 ...] --out DIR [--config FILE]

Ingest one or many image folders, audit them (bad files, exact and near duplicates, label conflicts) and
write a leak-free, class-stratified, group-aware split:
  OUT/split.csv   path,label,split (absolute paths, taxonomy labels, train|val|test)
  OUT/audit.json  everything the audit found, machine-readable
  OUT/summary.md  the same for a person (also printed)
Source folders are only read, never written.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from train.audit import AuditResult, audit_files, conflict_groups, group_labels
from train.config import Config, ConfigError, load_config
from train.datasets import COLUMNS, SPLITS, DatasetError, SourceScan, scan_source, source_folder
from train.split import assign_splits, leaking_pairs

EXIT_USAGE = 2
SUMMARY_LIST_LIMIT = 25      # rows per list in summary.md; audit.json always has all of them


def _fail(msg: str) -> int:
    print(f"prepare: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file + rename so an interrupted run never leaves a half-written output."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(data_dirs: list[str | Path], out_dir: str | Path, config: Config, log=print) -> dict:
    """Run ingestion + audit + split; write the outputs; return the audit dict. Raises DatasetError."""
    out = Path(out_dir).resolve()
    roots: list[Path] = []
    for d in data_dirs:
        p = source_folder(d)
        if p in roots:
            raise DatasetError(f"--data {p} given twice")
        for other in roots:
            if _is_within(p, other) or _is_within(other, p):
                raise DatasetError(f"--data folders overlap: {p} and {other}")
        if _is_within(out, p):
            raise DatasetError(f"--out {out} is inside the --data folder {p}; source folders are never written")
        roots.append(p)

    scans: list[SourceScan] = [scan_source(r, config) for r in roots]
    for i, s in enumerate(scans):
        note = (f" (its own splits {'/'.join(s.origin_splits)} are ignored: re-split leak-free)"
                if s.origin_splits else "")
        log(f"source {i}: {s.root}: layout '{s.layout}', {len(s.files)} image files{note}")

    # Entries with a class; the notebook's stage-1 "defective" files are only hashed to check that stage 2
    # holds them (they carry no defect class).
    entries, stage1_defective = [], []
    for i, s in enumerate(scans):
        for f in s.files:
            e = {"path": f.path, "label": f.label, "source": i, "origin_split": f.origin_split, "part": f.part}
            (entries if f.label is not None else stage1_defective).append(e)

    log(f"auditing {len(entries)} images (decode, sha256, 32x32 thumbnails, all-pairs correlation) ...")
    result = audit_files(entries, config.audit.near_duplicate_correlation, config.audit.max_image_pixels,
                         config.audit.max_file_bytes,
                         progress=lambda k, n: log(f"  {k}/{n} decoded"))

    if not result.records:
        examples = "; ".join(f"{x['path']}: {x['reason']}" for x in result.skipped[:5])
        raise DatasetError(f"none of the {len(entries)} image files could be read ({examples})")
    stage1_missing = _stage1_defective_missing(stage1_defective, result)
    audit = _build_split(result, scans, config)
    audit["notebook_stage1_defective"] = {"files": len(stage1_defective),
                                          "not_found_in_stage2": stage1_missing}
    audit["config"] = {"near_duplicate_correlation": config.audit.near_duplicate_correlation,
                       "max_image_pixels": config.audit.max_image_pixels,
                       "max_file_bytes": config.audit.max_file_bytes,
                       "split": {s: getattr(config.split, s) for s in SPLITS}, "seed": config.seed,
                       "taxonomy": config.taxonomy.classes}
    audit["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    out.mkdir(parents=True, exist_ok=True)
    rows = audit.pop("_rows")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    _write_atomic(out / "split.csv", buf.getvalue())
    _write_atomic(out / "audit.json", json.dumps(audit, indent=1) + "\n")
    summary = render_summary(audit)
    _write_atomic(out / "summary.md", summary)
    audit["outputs"] = {n: str(out / n) for n in ("split.csv", "audit.json", "summary.md")}
    return audit


def _stage1_defective_missing(stage1_defective: list[dict], result: AuditResult) -> list[str]:
    known = {r.sha256 for r in result.records}
    missing = []
    for e in stage1_defective:
        try:
            digest = hashlib.sha256(Path(e["path"]).read_bytes()).hexdigest()
        except OSError:
            missing.append(e["path"])
            continue
        if digest not in known:
            missing.append(e["path"])
    return missing


def _build_split(result: AuditResult, scans: list[SourceScan], config: Config) -> dict:
    recs = result.records
    conflicts = set(conflict_groups(result))

    # Exact duplicates: keep the first copy (source order, then path order) of each hash.
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_hash[r.sha256].append(i)
    dropped_copy_of: dict[int, int] = {}
    exact_groups = []
    for digest, ix in by_hash.items():
        if len(ix) < 2:
            continue
        keep = ix[0]
        labels = sorted({recs[i].label for i in ix})
        in_conflict = result.group_of[keep] in conflicts
        for i in ix[1:]:
            dropped_copy_of[i] = keep
        exact_groups.append({"sha256": digest, "kept": None if in_conflict else recs[keep].path,
                             "paths": [recs[i].path for i in ix], "labels": labels,
                             "sources": sorted({recs[i].source for i in ix}),
                             "excluded_label_conflict": in_conflict})

    # Units for the split: each non-conflicting group (minus exact copies) or a single image.
    units = []
    excluded_conflict = set()
    for g, members in enumerate(result.groups):
        if g in conflicts:
            excluded_conflict.update(members)
            continue
        kept = [recs[i].path for i in members if i not in dropped_copy_of]
        units.append((recs[members[0]].label, kept))
    for i, r in enumerate(recs):
        if result.group_of[i] == -1:
            units.append((r.label, [r.path]))
    fractions = {s: getattr(config.split, s) for s in SPLITS}
    assignment = assign_splits(units, fractions, config.seed)

    # Proof of the property the split exists for: no duplicate pair straddles two splits.
    pairs = [(recs[i].path, recs[j].path) for i, j, _c in result.pairs]
    leaks = leaking_pairs(pairs, assignment)
    if leaks:
        raise RuntimeError(f"internal error: {len(leaks)} near-duplicate pairs across splits, e.g. {leaks[0]}")

    label_of = {r.path: r.label for r in recs}
    order = {c: k for k, c in enumerate(config.taxonomy.classes)}
    rows = sorted(([p, label_of[p], s] for p, s in assignment.items()),
                  key=lambda row: (SPLITS.index(row[2]), order[row[1]], row[0]))

    pair_corr = defaultdict(list)
    for i, j, c in result.pairs:
        pair_corr[result.group_of[i]].append(c)
    near_groups = []
    for g, members in enumerate(result.groups):
        corr = pair_corr.get(g, [])
        near_groups.append({
            "id": g,
            "members": [{"path": recs[i].path, "label": recs[i].label, "source": recs[i].source,
                         "exact_copy_of": recs[dropped_copy_of[i]].path if i in dropped_copy_of else None}
                        for i in members],
            "labels": group_labels(result, members),
            "sources": sorted({recs[i].source for i in members}),
            "conflict": g in conflicts,
            "split": None if g in conflicts else assignment[recs[members[0]].path],
            "min_correlation": round(min(corr), 4) if corr else None,
        })

    # Cross-source overlap: images of source a that share a group with an image of source b.
    n_src = len(scans)
    cross = [[0] * n_src for _ in range(n_src)]
    for members in result.groups:
        srcs = {recs[i].source for i in members}
        for i in members:
            for b in srcs:
                if b != recs[i].source:
                    cross[recs[i].source][b] += 1

    counts = {c: dict.fromkeys(SPLITS, 0) for c in config.taxonomy.classes}
    for _p, label, split in rows:
        counts[label][split] += 1
    per_source = []
    for k, s in enumerate(scans):
        skipped_k = [x for x in result.skipped if x["source"] == k]
        src_recs = [i for i, r in enumerate(recs) if r.source == k]
        used = [i for i in src_recs if recs[i].path in assignment]
        per_source.append({
            "path": s.root, "layout": s.layout, "origin_splits_ignored": s.origin_splits,
            "folders": s.folders, "image_files": len(s.files), "decoded": len(src_recs),
            "skipped_bad": len(skipped_k), "unsupported": len(s.unsupported), "stray_files": len(s.stray),
            "exact_copies_dropped": sum(1 for i in src_recs if i in dropped_copy_of),
            "excluded_label_conflict": sum(1 for i in src_recs if i in excluded_conflict),
            "used": len(used),
            "per_class": dict(Counter(recs[i].label for i in used)),
            "per_split": {sp: sum(1 for i in used if assignment[recs[i].path] == sp) for sp in SPLITS},
        })

    skipped = [{"path": x["path"], "reason": x["reason"]} for x in result.skipped]
    for s in scans:
        skipped += [{"path": p, "reason": "unsupported type"} for p in s.unsupported]
        skipped += [{"path": p, "reason": "not inside a class folder"} for p in s.stray]

    return {
        "_rows": rows,
        "sources": per_source,
        "counts": {
            "images_found": sum(len(s.files) for s in scans),
            "decoded": len(recs), "skipped": len(skipped), "in_split": len(rows),
            "exact_duplicate_groups": len(exact_groups), "exact_copies_dropped": len(dropped_copy_of),
            "near_duplicate_pairs": len(result.pairs), "duplicate_groups": len(result.groups),
            "images_in_duplicate_groups": sum(len(g) for g in result.groups),
            "cross_source_groups": sum(1 for g in near_groups if len(g["sources"]) > 1),
            "label_conflict_groups": len(conflicts), "excluded_label_conflict": len(excluded_conflict),
            "per_class_split": counts,
            "cross_source_images": cross,
        },
        "skipped": skipped,
        "exact_duplicate_groups": exact_groups,
        "near_duplicate_groups": near_groups,
        "conflicts": [g for g in near_groups if g["conflict"]],
    }


# ---- summary ---------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]]


def _short(path: str, roots: list[str]) -> str:
    for k, r in enumerate(roots):
        if path.startswith(r + os.sep):
            return f"[{k}]/{path[len(r) + 1:]}"
    return path


def class_split_table(audit: dict) -> list[str]:
    counts = audit["counts"]["per_class_split"]
    rows = [[c, *(v[s] for s in SPLITS), sum(v.values())] for c, v in counts.items()]
    rows.append(["**total**", *(sum(v[s] for v in counts.values()) for s in SPLITS),
                 sum(sum(v.values()) for v in counts.values())])
    return _table(["class", *SPLITS, "total"], rows)


def render_summary(audit: dict) -> str:
    roots = [s["path"] for s in audit["sources"]]
    c = audit["counts"]
    L = ["# Dataset preparation summary", "",
         f"{c['in_split']} images in split.csv from {len(roots)} source(s); {c['skipped']} files skipped; "
         f"{c['exact_copies_dropped']} exact copies dropped; {c['excluded_label_conflict']} images in "
         f"{c['label_conflict_groups']} label-conflict groups excluded. Seed {audit['config']['seed']}, "
         f"split {'/'.join(str(audit['config']['split'][s]) for s in SPLITS)}, near-duplicate correlation >= "
         f"{audit['config']['near_duplicate_correlation']} (32x32 z-scored thumbnails).", "",
         "## Images per class and split", ""]
    L += class_split_table(audit)
    thin = [f"{cl} has no {sp} images" for cl, v in c["per_class_split"].items() if sum(v.values())
            for sp in SPLITS if v[sp] == 0]
    if thin:
        L += ["", "Warning: " + "; ".join(thin) + " (too few images, or one large duplicate group)."]
    L += ["", "## Sources", ""]
    rows = []
    for k, s in enumerate(audit["sources"]):
        note = f"its {'/'.join(s['origin_splits_ignored'])} split ignored" if s["origin_splits_ignored"] else ""
        rows.append([f"[{k}] {s['path']}", s["layout"], s["image_files"], s["skipped_bad"] + s["unsupported"]
                     + s["stray_files"], s["exact_copies_dropped"], s["excluded_label_conflict"], s["used"],
                     "/".join(str(s["per_split"][sp]) for sp in SPLITS), note])
    L += _table(["source", "layout", "images", "skipped", "exact copies", "conflict excl.", "used",
                 "train/val/test", "note"], rows)
    classes = list(c["per_class_split"])
    L += ["", "Images per class and source (in split.csv):", ""]
    L += _table(["class", *(f"[{k}]" for k in range(len(roots)))],
                [[cl, *(s["per_class"].get(cl, 0) for s in audit["sources"])] for cl in classes])
    L += ["", "Folder mapping: " + "; ".join(
        f"[{k}] " + ", ".join(f"{f}->{lab or 'stage-1 defective (class from stage 2)'}"
                              for f, lab in sorted(s["folders"].items()))
        for k, s in enumerate(audit["sources"]))]
    nb = audit.get("notebook_stage1_defective", {})
    if nb.get("files"):
        L += ["", f"Notebook layout: {nb['files']} stage-1 defective files not used as labelled data "
                  f"(their classes come from stage 2); {len(nb['not_found_in_stage2'])} of them have no "
                  f"byte-identical copy in stage 2 (listed in audit.json)."]
    L += ["", "## Duplicates", "",
          f"- exact duplicates (same sha256): {c['exact_duplicate_groups']} groups, "
          f"{c['exact_copies_dropped']} extra copies dropped (one representative kept)",
          f"- near duplicates: {c['near_duplicate_pairs']} pairs forming {c['duplicate_groups']} groups "
          f"({c['images_in_duplicate_groups']} images); each group sits in a single split",
          f"- groups spanning more than one source: {c['cross_source_groups']}"]
    if len(roots) > 1:
        L += ["", "Cross-source near duplicates (row source: its images that share a group with an image of the "
                  "column source):", ""]
        L += _table(["source", *(f"[{k}]" for k in range(len(roots)))],
                    [[f"[{a}] ({audit['sources'][a]['decoded']} images)",
                      *(("-" if a == b else c["cross_source_images"][a][b]) for b in range(len(roots)))]
                     for a in range(len(roots))])
    big = sorted(audit["near_duplicate_groups"], key=lambda g: -len(g["members"]))[:10]
    if big:
        L += ["", "Largest duplicate groups (a group always goes whole into one split):", ""]
        L += _table(["group", "images", "labels", "sources", "split", "min corr", "example"],
                    [[g["id"], len(g["members"]), ", ".join(g["labels"]), ",".join(map(str, g["sources"])),
                      g["split"] or "excluded (conflict)", g["min_correlation"] if g["min_correlation"] is not None
                      else "exact", _short(g["members"][0]["path"], roots)] for g in big])
    L += ["", "## Label conflicts (excluded from the split)", ""]
    if audit["conflicts"]:
        rows = [[g["id"], ", ".join(g["labels"]), len(g["members"]),
                 "; ".join(f"{_short(m['path'], roots)} ({m['label']})" for m in g["members"][:4])
                 + (" ..." if len(g["members"]) > 4 else "")] for g in audit["conflicts"][:SUMMARY_LIST_LIMIT]]
        L += _table(["group", "labels", "images", "members"], rows)
        if len(audit["conflicts"]) > SUMMARY_LIST_LIMIT:
            L.append(f"... and {len(audit['conflicts']) - SUMMARY_LIST_LIMIT} more in audit.json")
    else:
        L.append("none")
    L += ["", "## Skipped files", ""]
    if audit["skipped"]:
        L += _table(["file", "reason"], [[_short(x["path"], roots), x["reason"]]
                                         for x in audit["skipped"][:SUMMARY_LIST_LIMIT]])
        if len(audit["skipped"]) > SUMMARY_LIST_LIMIT:
            L.append(f"... and {len(audit['skipped']) - SUMMARY_LIST_LIMIT} more in audit.json")
    else:
        L.append("none")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="image folder (CLASS/*, train|val|test/CLASS/*, or the notebook layout); repeatable")
    parser.add_argument("--out", required=True, metavar="DIR", help="where split.csv, audit.json, summary.md go")
    parser.add_argument("--config", default=None, metavar="FILE", help="config YAML (default configs/default.yaml)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        audit = prepare(args.data, args.out, config, log=log)
    except DatasetError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write outputs to {args.out}: {exc}")
    print(render_summary(audit))
    print(f"wrote {', '.join(audit['outputs'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
