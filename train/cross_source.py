"""python -m train cross-source --data A --data B [--data C ...] --out runs/xs [--profile real] [--reference RUN]

Generalisation, not memory: for each source folder, train both stages on all the OTHER sources and test on
the held-out one, then report per-source figures beside the in-distribution test split.

- All sources are prepared together once (`train prepare`: bad files, exact and near duplicates, conflicts),
  so a held-out image that is a near copy of another source's image (a duplicate group spanning sources)
  is left out of that source's test set: it would measure memory. How many were left out is reported.
- A fold trains on the other sources' train split and calibrates the Stage-1 threshold on their val split
  (a new source brings no labels of its own), exactly as a normal run.
- The in-distribution figure is the standard split of all sources: an existing run given with
  `--reference runs/NAME` (trained on the same sources), or trained here as the fold `all`.
Writes OUT/cross_source.json and OUT/cross_source.md; each fold's full run stays in OUT/fold-NAME/.

Adaptation (`--shots 0,5,10,20,40 [--seeds 3]`): how fast a held-out source is learnt from its own labels.
Each fold's run is converted to an int8 bundle by the command a user runs (`python -m convert --int8`, in a
child process: train never imports convert); the held-out images go once through the bundle's backbones
(edge_runtime.adapt.features, as `edge-inspect adapt` does), and for each k and seed, k labelled images a
class are drawn from the held-out source, the heads refitted on them plus the bundle's replay set by the very
code the adapt commands run (edge_runtime.adapt.refit), and the rest of the source scored: macro-F1, clean
specificity, defect recall and Stage-1 ROC-AUC per k (mean and spread over seeds), as a table and a plotted
learning curve (OUT/shots.png). k = 0 is the fold's bundle as converted.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from train.config import ConfigError, load_config
from train.datasets import DatasetError

log = logging.getLogger("train.cross_source")


def source_of(path: str, roots: list[str]) -> int:
    """Index of the source folder holding `path` (the longest matching root wins)."""
    best, best_len = -1, -1
    for k, root in enumerate(roots):
        prefix = root.rstrip(os.sep) + os.sep
        if path.startswith(prefix) and len(prefix) > best_len:
            best, best_len = k, len(prefix)
    if best < 0:
        raise ValueError(f"{path} is in none of the sources {roots}")
    return best


def fold_rows(rows: list[tuple[str, str, str]], audit: dict, held_out: int) -> tuple[list, dict]:
    """Rows of a fold's split.csv: the other sources' train/val; the held-out source (minus near copies of
    other sources' images) as test. Returns (rows, counts)."""
    roots = [s["path"] for s in audit["sources"]]
    kept = {r[0] for r in rows}   # exact copies and label conflicts were already dropped by prepare
    shared = set()   # held-out images in a duplicate group with another source's image that trains
    for group in audit["near_duplicate_groups"]:
        if any(m["source"] != held_out and m["path"] in kept for m in group["members"]):
            shared.update(m["path"] for m in group["members"] if m["source"] == held_out)
    out, left_out = [], 0
    for path, label, split in rows:
        if source_of(path, roots) == held_out:
            if path in shared:
                left_out += 1
            else:
                out.append((path, label, "test"))
        elif split in ("train", "val"):
            out.append((path, label, split))
    return out, {"test": sum(1 for r in out if r[2] == "test"), "left_out_near_copies": left_out,
                 "train": sum(1 for r in out if r[2] == "train"), "val": sum(1 for r in out if r[2] == "val")}


def summarise(metrics: dict, trained_classes: list[str] | None = None) -> dict:
    """The figures compared across folds, from a run's metrics.json."""
    e2e, s1 = metrics["end_to_end_test"], metrics["stage1"]["test"]
    out = {"n": e2e["n"], "macro_f1": e2e["macro_f1"], "accuracy": e2e["accuracy"],
           "defect_recall": 1.0 - e2e["escape_rate"] if e2e["defective"] else None,
           "clean_specificity": 1.0 - e2e["false_alarms"] / e2e["clean"] if e2e["clean"] else None,
           "stage1_roc_auc": s1["roc_auc"], "stage2_macro_f1": metrics["stage2"]["test"]["macro_f1"],
           "review_fraction": e2e["review_fraction"]}
    if trained_classes is not None:
        # Macro-F1 over the classes the fold could learn (a class only the held-out source has is
        # unlearnable there): both figures are shown, neither hides the other.
        f1 = [v["f1"] for c, v in e2e["per_class"].items()
              if c in trained_classes and (v["support"] > 0)]
        out["macro_f1_trained_classes"] = sum(f1) / len(f1) if f1 else None
    return out


def _fmt(v):
    if v is None:
        return "n/a"
    return f"{v:.3f}"


def render(result: dict) -> str:
    L = ["# Cross-source evaluation", "",
         f"Profile `{result['profile']}`, weights `{result['weights']}`. Each row: trained on every other "
         "source, tested on the held-out one (near copies of training images left out). The in-distribution "
         "row is the standard 70/15/15 split of all sources.", "",
         "| test set | images | left out (near copies) | e2e macro-F1 | macro-F1, trained classes | accuracy | "
         "defect recall | clean specificity | Stage-1 ROC-AUC | Stage-2 macro-F1 | review |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s = row["summary"]
        L.append(f"| {row['name']} | {s['n']} | {row.get('left_out_near_copies', '-')} | {_fmt(s['macro_f1'])} | "
                 f"{_fmt(s.get('macro_f1_trained_classes'))} | {_fmt(s['accuracy'])} | {_fmt(s['defect_recall'])} | "
                 f"{_fmt(s['clean_specificity'])} | {_fmt(s['stage1_roc_auc'])} | {_fmt(s['stage2_macro_f1'])} | "
                 f"{_fmt(s['review_fraction'])} |")
    if result.get("gap") is not None:
        L += ["", f"Largest drop from in-distribution macro-F1 to a held-out source: {result['gap']:.3f} "
                  f"(aim: <= 0.10)."]
    return "\n".join(L) + "\n"


def _train(split_csv: Path, out: Path, args) -> dict:
    from train.trainer import main as train_main

    argv = ["--split", str(split_csv), "--out", str(out), "--profile", args.profile, "--weights", args.weights]
    if args.config:
        argv += ["--config", args.config]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    rc = train_main(argv)
    if rc != 0:
        raise SystemExit(rc)
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m train cross-source", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", action="append", required=True, metavar="DIR", help="a source folder (2 or more)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--profile", default="real")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--config", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--reference", metavar="RUN", help="a finished run on the same sources' standard split "
                                                      "(its test figures are the in-distribution row)")
    p.add_argument("--only", action="append", metavar="NAME", help="hold out only these sources (folder names)")
    p.add_argument("--shots", metavar="K,K,...", help="adaptation learning curve: labelled images per class "
                                                      "taken from the held-out source, e.g. 0,5,10,20,40")
    p.add_argument("--seeds", type=int, default=3, help="random draws per k (default 3)")
    p.add_argument("--fab-weight", type=float, default=None, help="weight of the held-out source's labels "
                                                                  "(default: the adapt commands' default)")
    args = p.parse_args(argv)
    try:
        shots = sorted({int(k) for k in args.shots.split(",") if k.strip()}) if args.shots else []
    except ValueError:
        p.error(f"--shots {args.shots!r}: expected comma-separated whole numbers")
    if any(k < 0 for k in shots) or args.seeds < 1:
        p.error("--shots must be >= 0 and --seeds >= 1")
    if len(args.data) < 2:
        p.error("cross-source needs at least two --data sources")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from train.prepare import prepare
    try:
        audit = prepare(args.data, out / "data", cfg, log=lambda msg: log.info("%s", msg))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with (out / "data" / "split.csv").open(newline="", encoding="utf-8") as fh:
        rows = [(r["path"], r["label"], r["split"]) for r in csv.DictReader(fh)]
    names = [Path(s["path"]).name for s in audit["sources"]]
    if len(set(names)) != len(names):
        names = [f"{k}-{n}" for k, n in enumerate(names)]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"error: --only {unknown}: not among the sources {names}", file=sys.stderr)
        return 2

    result = {"profile": args.profile, "weights": args.weights, "sources": names, "rows": []}
    if args.reference:
        ref = Path(args.reference)
        try:
            metrics = json.loads((ref / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"error: --reference {ref}: no readable metrics.json ({exc})", file=sys.stderr)
            return 2
        result["rows"].append({"name": f"in-distribution ({ref.name})", "summary": summarise(metrics)})
    else:
        metrics = _train(out / "data" / "split.csv", out / "fold-all", args)
        result["rows"].append({"name": "in-distribution (all sources)", "summary": summarise(metrics)})

    for k, name in enumerate(names):
        if args.only and name not in args.only:
            continue
        fold, counts = fold_rows(rows, audit, k)
        if counts["test"] == 0 or counts["train"] == 0:
            log.warning("fold %s: %s, skipped", name, counts)
            continue
        fold_dir = out / f"fold-{name}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        with (fold_dir / "fold_split.csv").open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split"])
            w.writerows(fold)
        log.info("fold %s: %s", name, counts)
        metrics = _train(fold_dir / "fold_split.csv", fold_dir, args)
        trained = sorted({lab for _p, lab, s in fold if s == "train"})
        result["rows"].append({"name": f"held out: {name}", **counts, "summary": summarise(metrics, trained)})
        if shots:
            from train.shots import learning_curve

            result.setdefault("shots", {})[name] = learning_curve(
                fold_dir, [(p_, lab) for p_, lab, sp in fold if sp == "test"], shots, args.seeds,
                **({"fab_weight": args.fab_weight} if args.fab_weight else {}),
                target_recall=cfg.gating.target_defect_recall)
        (out / "cross_source.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    held = [r["summary"]["macro_f1"] for r in result["rows"][1:]]
    result["gap"] = result["rows"][0]["summary"]["macro_f1"] - min(held) if held else None
    (out / "cross_source.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    text = render(result)
    if result.get("shots"):
        from train.shots import plot_curves, render_shots

        text += render_shots(result["shots"])
        plot_curves(result["shots"], out / "shots.png")
        text += "\n![learning curves](shots.png)\n"
    (out / "cross_source.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
