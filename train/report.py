"""Evaluate a finished training run and write its artefacts into runs/NAME/.

run.json (what convert and the edge need: sizes, class order, calibrated gating), metrics.json (per stage on
val and test, end-to-end two-stage 8-class on test, defect escapes), history.json, curves and
confusion-matrix PNGs, report.md.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edge_runtime.gate import is_defective, needs_review
from edge_runtime.evaluation import classification_metrics, escape_rate, roc_auc, threshold_for_recall, two_stage_labels

log = logging.getLogger("train.report")


def stage1_metrics(scores, y_true, threshold: float) -> dict:
    pred = is_defective(np.asarray(scores).reshape(-1), threshold).astype(int)
    m = classification_metrics(y_true, pred, ["clean", "defective"])
    m["threshold"] = float(threshold)
    m["roc_auc"] = roc_auc(scores, np.asarray(y_true) == 1)   # threshold-free: is there any signal at all?
    m["defect_recall"] = m["per_class"]["defective"]["recall"]
    m["escape_rate"] = 1.0 - m["defect_recall"] if m["per_class"]["defective"]["support"] else 0.0
    return m


def stage2_metrics(probs, y_true, classes, review_floor: float) -> dict:
    probs = np.asarray(probs)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    m = classification_metrics(y_true, pred, classes)
    review = needs_review(probs.max(axis=1), review_floor) if len(probs) else np.zeros(0, bool)
    confident = ~review
    m["review_fraction"] = float(review.mean()) if len(probs) else 0.0
    m["accuracy_when_confident"] = float((pred[confident] == np.asarray(y_true)[confident]).mean()) \
        if confident.any() else None
    return m


def plot_confusion(cm, classes, title, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=prefix + key)
        phases = history.get("phase", [])
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i + 0.5, color="grey", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(f"{title}: {key}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name, m):
    return (f"| {name} | {m['n']} | {m['accuracy']:.3f} | {m['macro_precision']:.3f} | "
            f"{m['macro_recall']:.3f} | {m['macro_f1']:.3f} |")


def evaluate_and_report(results: dict, samples, *, cfg, profile, out: Path, run_info: dict,
                        wall_seconds: float) -> dict:
    metrics: dict = {"wall_seconds": wall_seconds}
    run = dict(run_info)
    run["stage2_review_floor"] = cfg.gating.stage2_review_floor
    target_recall = profile.target_defect_recall or cfg.gating.target_defect_recall
    run["target_defect_recall"] = target_recall
    threshold = None
    if 1 in results:
        r = results[1]
        val_scores = r["pred"]["val"].reshape(-1)
        defective_val = val_scores[r["y"]["val"] == 1]
        threshold = threshold_for_recall(defective_val, target_recall)
        run["stage1_threshold"] = threshold
        metrics["stage1"] = {
            "classes": r["classes"], "threshold": threshold, "seconds": r["seconds"], "best_phase": r.get("best_phase"),
            "val": stage1_metrics(r["pred"]["val"], r["y"]["val"], threshold),
            "test": stage1_metrics(r["pred"]["test"], r["y"]["test"], threshold),
            "test_at_0.5": stage1_metrics(r["pred"]["test"], r["y"]["test"], 0.5),
        }
        plot_curves(r["history"], "stage 1", out / "stage1_curves.png")
        plot_confusion(metrics["stage1"]["test"]["confusion_matrix"], r["classes"],
                       f"stage 1 test (threshold {threshold:.3f})", out / "stage1_confusion.png")
    if 2 in results:
        r = results[2]
        run["stage2_classes"] = r["classes"]
        floor = cfg.gating.stage2_review_floor
        metrics["stage2"] = {
            "classes": r["classes"], "review_floor": floor, "seconds": r["seconds"], "best_phase": r.get("best_phase"),
            "val": stage2_metrics(r["pred"]["val"], r["y"]["val"], r["classes"], floor),
            "test": stage2_metrics(r["pred"]["test"], r["y"]["test"], r["classes"], floor),
        }
        plot_curves(r["history"], "stage 2", out / "stage2_curves.png")
        plot_confusion(metrics["stage2"]["test"]["confusion_matrix"], r["classes"], "stage 2 test (defects only)",
                       out / "stage2_confusion.png")
    if 1 in results and 2 in results:
        # End to end on every test image: Stage 1 gates, Stage 2 names the defect.
        from train.data import load_arrays

        test1 = results[1]["sets"]["test"]
        truth = {s.path: s.label for s in samples}
        true_labels = [truth[p] for p in test1.paths]
        # Stage 2 at its own input size (it may differ from Stage 1's)
        test2 = test1 if results[2]["image_size"] == results[1]["image_size"] else \
            load_arrays([(p, truth[p]) for p in test1.paths], results[2]["image_size"])
        probs2 = results[2]["model"].predict(test2.x.astype(np.float32), batch_size=64, verbose=0) \
            if len(test2.x) else np.zeros((0, len(results[2]["classes"])))
        final, review = two_stage_labels(results[1]["pred"]["test"], probs2, threshold, results[2]["classes"],
                                         cfg.taxonomy.clean, cfg.gating.stage2_review_floor)
        classes = cfg.taxonomy.classes
        index = {c: i for i, c in enumerate(classes)}
        e2e = classification_metrics([index[t] for t in true_labels], [index[f] for f in final], classes)
        e2e.update(escape_rate(true_labels, final, cfg.taxonomy.clean))
        e2e["review_fraction"] = float(review.mean()) if len(review) else 0.0
        metrics["end_to_end_test"] = e2e
        plot_confusion(e2e["confusion_matrix"], classes, "two-stage end to end (test)", out / "e2e_confusion.png")

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out / "run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    (out / "history.json").write_text(json.dumps({f"stage{k}": v["history"] for k, v in results.items()},
                                                 indent=2), encoding="utf-8")
    write_markdown(metrics, run, out / "report.md")
    print((out / "report.md").read_text(encoding="utf-8"))
    return metrics


def write_markdown(metrics: dict, run: dict, path: Path) -> None:
    lines = [f"# Training run `{path.parent.name}`", "",
             f"Profile `{run['profile']}` (method {run.get('method', 'finetune')}, "
             f"features {run.get('features', 'gap')}), input "
             + " / ".join(f"{k} {n}x{n}" for k, n in run.get("image_sizes", {"both": run["image_size"]}).items())
             + f", Stage-1 classes {run.get('stage1_classes', ['defective'])}, weights `{run['weights']}`, "
             f"backbones {run['backbones']}, seed {run['seed']}, created {run['created']}, "
             f"wall time {metrics['wall_seconds'] / 60:.1f} min on {run['hardware']}.", "",
             "| model / split | n | accuracy | macro precision | macro recall | macro F1 |",
             "|---|---|---|---|---|---|"]
    for stage in ("stage1", "stage2"):
        if stage in metrics:
            for split in ("val", "test"):
                lines.append(_row(f"{stage} {split}", metrics[stage][split]))
    if "end_to_end_test" in metrics:
        lines.append(_row("two-stage end to end (8 classes), test", metrics["end_to_end_test"]))
    lines.append("")
    if "stage1" in metrics:
        s1 = metrics["stage1"]
        lines.append(f"Stage-1 threshold {s1['threshold']:.4f}, calibrated on val for defect recall >= "
                     f"{run['target_defect_recall']}: test defect recall {s1['test']['defect_recall']:.3f}, "
                     f"test escape rate {s1['test']['escape_rate']:.3f} "
                     f"(at a fixed 0.5: recall {s1['test_at_0.5']['defect_recall']:.3f}); test ROC-AUC "
                     + ("n/a" if s1["test"]["roc_auc"] is None else f"{s1['test']['roc_auc']:.3f}") + ".")
    if "stage2" in metrics:
        s2 = metrics["stage2"]
        lines.append(f"Stage-2 review floor {s2['review_floor']}: {s2['test']['review_fraction']:.1%} of test defects "
                     f"flagged `review`.")
    if "end_to_end_test" in metrics:
        e = metrics["end_to_end_test"]
        lines.append(f"End to end: {e['escapes']} of {e['defective']} defective test images called clean "
                     f"(escape rate {e['escape_rate']:.3f}); {e['false_alarms']} of {e['clean']} clean images flagged.")
        lines += ["", "Per-class F1 (end to end, test): " + ", ".join(
            f"{c} {v['f1']:.2f} (n={v['support']})" for c, v in e["per_class"].items())]
    lines.append("")
    for png in ("stage1_curves.png", "stage2_curves.png", "stage1_confusion.png", "stage2_confusion.png",
                "e2e_confusion.png"):
        if (path.parent / png).exists():
            lines.append(f"![{png}]({png})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
