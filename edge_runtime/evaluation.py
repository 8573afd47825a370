"""Classification metrics from real predictions (numpy only): one definition for training, convert, the
benchmarks and adaptation on the board; threshold_for_recall is how the Stage-1 threshold is calibrated."""
from __future__ import annotations

import numpy as np

from edge_runtime.gate import is_defective, needs_review


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def classification_metrics(y_true, y_pred, class_names: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1 (over classes present in truth or predictions), per class, confusion."""
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    actual = cm.sum(axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (actual > 0) | (predicted > 0)
    total = cm.sum()
    return {
        "n": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(actual[i])} for i, name in enumerate(class_names)},
        "classes": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


def roc_auc(scores, positive) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); None without both classes."""
    scores = np.asarray(scores, float).reshape(-1)
    positive = np.asarray(positive, bool).reshape(-1)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):                      # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_for_recall(scores_defective, target_recall: float) -> float:
    """Largest threshold t such that at least `target_recall` of defective scores are >= t."""
    s = np.sort(np.asarray(scores_defective, dtype=float))
    if s.size == 0:
        return 0.5
    k = int(np.floor((1.0 - target_recall) * s.size + 1e-9))  # how many defectives may fall below t
    return float(s[min(k, s.size - 1)])


def two_stage_labels(stage1_scores, stage2_probs, threshold: float, stage2_classes: list[str],
                     clean_label: str = "clean", review_floor: float | None = None):
    """Final labels of the gated pipeline: clean below the threshold, else Stage 2's top-1."""
    s1 = np.asarray(stage1_scores, float).reshape(-1)
    p2 = np.asarray(stage2_probs, float)
    top = p2.argmax(axis=1)
    defective = is_defective(s1, threshold)
    labels = np.where(defective, np.asarray(stage2_classes, dtype=object)[top], clean_label)
    review = defective & needs_review(p2.max(axis=1), review_floor) if review_floor is not None else None
    return labels, review


def escape_rate(true_labels, final_labels, clean_label: str = "clean") -> dict:
    """Defect escapes: defective images the pipeline called clean."""
    t = np.asarray(true_labels, dtype=object)
    f = np.asarray(final_labels, dtype=object)
    defective = t != clean_label
    escapes = int(np.sum(defective & (f == clean_label)))
    n_def = int(defective.sum())
    return {"escapes": escapes, "defective": n_def, "escape_rate": escapes / n_def if n_def else 0.0,
            "false_alarms": int(np.sum(~defective & (f != clean_label))), "clean": int((~defective).sum())}
