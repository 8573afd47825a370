"""The adaptation learning curve of one held-out source (`python -m train cross-source --shots ...`).

The fold's run becomes an int8 bundle through `python -m convert --int8` (a child process: train never
imports convert). Every held-out image goes once through that bundle's backbones; then for each k and seed,
k images a class are the "fab's labels", the heads are refitted on them and the replay set by
edge_runtime.adapt.refit (the adapt commands' own code), and the remaining images are scored with the new
heads and gating. k = 0 scores the bundle as converted.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_runtime.adapt.features import FeatureSet, extract, load_replay
from edge_runtime.adapt.refit import AdaptError, refit, score
from edge_runtime.bundle import load_bundle
from edge_runtime.digest import sha256_file
from edge_runtime.evaluation import roc_auc
from edge_runtime.gate import is_defective, stage1_score
from edge_runtime.inspector import Inspector

log = logging.getLogger("train.shots")
METRICS = ("macro_f1", "clean_specificity", "defect_recall", "stage1_roc_auc")


def convert_fold(run_dir: Path) -> Path:
    """The fold's int8 bundle (with its replay set), made by the convert command."""
    bundle = run_dir.parent / f"{run_dir.name}-bundle-int8"     # convert refuses a bundle inside its run
    cmd = [sys.executable, "-m", "convert", "--int8", "--run", str(run_dir), "--out", str(bundle), "--no-compare"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return bundle


def draw(labels: list[str], k: int, seed: int) -> np.ndarray:
    """Indices of k images per class (all of a class when it has k or fewer, keeping one to score)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    picked = []
    for c in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels_arr == c))
        picked.extend(idx[:min(k, max(len(idx) - 1, 0))])
    return np.sort(np.asarray(picked, np.int64))


def evaluate(bundle, heads, threshold: float, feats: FeatureSet) -> dict:
    s1 = stage1_score(heads[1].probs(feats.stage1), heads[1].classes, bundle.clean_label)
    top = np.asarray(heads[2].classes, dtype=object)[heads[2].probs(feats.stage2).argmax(axis=1)]
    final = np.where(is_defective(s1, threshold), top, bundle.clean_label)
    m = score(bundle, feats.labels, final, s1, threshold)
    m["stage1_roc_auc"] = roc_auc(s1, np.asarray(feats.labels) != bundle.clean_label)
    return m


def learning_curve(run_dir: Path, rows: list[tuple[str, str]], shots: list[int], seeds: int, *,
                   fab_weight: float | None = None, target_recall: float = 0.98) -> dict:
    bundle_dir = convert_fold(run_dir)
    bundle = load_bundle(bundle_dir)
    replay = load_replay(bundle)
    feats, skipped = extract(Inspector(bundle), rows)
    digests = [sha256_file(p) for p in feats.paths]
    log.info("shots: %d held-out images through %s (%d unreadable)", len(feats), bundle_dir, len(skipped))
    curve = {"bundle": str(bundle_dir), "images": len(feats), "fab_weight": fab_weight, "points": []}
    for k in shots:
        runs = []
        for seed in range(seeds if k else 1):
            picked = draw(feats.labels, k, seed) if k else np.zeros(0, np.int64)
            rest = np.setdiff1d(np.arange(len(feats)), picked)
            if k:
                fab = feats.take(picked)
                try:
                    r = refit(bundle, fab, replay, [digests[i] for i in picked], fab_weight=fab_weight,
                              target_recall=target_recall, seed=seed)
                except AdaptError as exc:
                    log.warning("shots k=%d seed %d: %s", k, seed, exc)
                    continue
                heads, threshold, seconds, weight = r.heads, r.gating["stage1_threshold"], r.seconds, \
                    r.report["fab_weight"]
            else:
                heads, threshold, seconds, weight = bundle.heads, bundle.stage1_threshold, 0.0, None
            m = evaluate(bundle, heads, threshold, feats.take(rest))
            runs.append({"seed": seed, "scored": len(rest), "refit_seconds": round(seconds, 2), "fab_weight": weight,
                         **{key: m[key] for key in METRICS}})
        point = {"k": k, "runs": runs}
        for key in METRICS:
            vals = [r[key] for r in runs if r[key] is not None]
            point[key] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))} \
                if vals else None
        curve["points"].append(point)
        log.info("shots k=%d: %s", k, {key: round(point[key]["mean"], 3) for key in METRICS if point[key]})
    return curve


def render_shots(shots: dict) -> str:
    lines = ["", "## Adaptation from the held-out source's own labels (int8 bundle, `edge-inspect adapt` code)", "",
             "k labelled images a class from the held-out source (fab weight: {w}), heads refitted with the "
             "replay set, the rest scored; mean (min-max) over seeds.".format(
                 w=next(iter(shots.values()))["fab_weight"] or "chosen out of fold, as the adapt commands do"), "",
             "| held out | k | seeds | scored | macro-F1 | clean specificity | defect recall | Stage-1 ROC-AUC | "
             "refit s |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(m):
        return "n/a" if m is None else f"{m['mean']:.3f} ({m['min']:.2f}-{m['max']:.2f})"

    for name, curve in shots.items():
        for p in curve["points"]:
            scored = int(np.mean([r["scored"] for r in p["runs"]])) if p["runs"] else 0
            secs = np.mean([r["refit_seconds"] for r in p["runs"]]) if p["runs"] else 0.0
            lines.append(f"| {name} | {p['k']} | {len(p['runs'])} | {scored} | {cell(p['macro_f1'])} | "
                         f"{cell(p['clean_specificity'])} | {cell(p['defect_recall'])} | "
                         f"{cell(p['stage1_roc_auc'])} | {secs:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curves(shots: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("macro_f1", "clean_specificity", "defect_recall"),
                              ("macro-F1", "clean specificity", "defect recall")):
        for name, curve in shots.items():
            pts = [p for p in curve["points"] if p[key]]
            ks = [p["k"] for p in pts]
            mean = [p[key]["mean"] for p in pts]
            ax.plot(ks, mean, "o-", label=name)
            ax.fill_between(ks, [p[key]["min"] for p in pts], [p[key]["max"] for p in pts], alpha=0.2)
        ax.set_xlabel("labelled images per class")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
