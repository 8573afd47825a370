"""Refit a bundle's heads on a fab's own labelled images: the core of `edge-inspect adapt` (on the board) and
`python -m train adapt` (centrally). numpy only.

    features   each labelled image through the bundle's own backbones (edge_runtime/adapt/features.py)
    training   the bundle's replay set (public training features, weight 1) + the fab's images weighted up,
               classes balanced; one softmax head per stage (fit.py). The fab's weight is the one of FAB_WEIGHTS
               whose out-of-fold macro-F1 is best (or the one given)
    calibration  out-of-fold scores of the fab's images (stratified k-fold): the Stage-1 threshold for the target
               defect recall, the Stage-2 review floor for the target accuracy of what is not sent to review
    report     cross-validated macro-F1, clean specificity and defect recall on the fab's images, beside the
               current bundle's answers on the same images
    output     a new bundle (derive.py): same backbones, new heads and gating, `parent` and `adapted` in its
               manifest (the data's sha256 included)

Reviews that disagree (the same image content under two labels) are left out and named in the report
(`conflicts_left_out`: edge_runtime/review/conflicts.py, the rule the review page and export-labels follow);
the other images are used. Refused with AdaptError (exit 2, nothing written): no images (left), one class only,
labels the bundle does not know, images that are the bundle's own training images (the replay set), a bundle
without a replay set or in format /1.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.adapt.features import FeatureSet
from edge_runtime.adapt.fit import DEFAULT_LAMBDA, balanced_weights, fit_softmax, stratified_folds
from edge_runtime.bundle import FORMAT, Bundle
from edge_runtime.evaluation import classification_metrics, escape_rate, threshold_for_recall
from edge_runtime.gate import is_defective, needs_review, stage1_score
from edge_runtime.head import Head
from edge_runtime.review.conflicts import Conflicts, conflicts_report, split_conflicts

log = logging.getLogger("edge_inspect.adapt")

FAB_WEIGHTS = (4.0, 10.0, 30.0)   # tried out of fold; x4 was best on one source, x30 on another (docs/adaptation.md)
FOLDS = 5
REVIEW_ACCURACY = 0.90     # the review floor keeps what is not sent to review this accurate (out of fold)
SAME_FEATURES = 2e-3       # relative distance under which a fab image's features are a replay image's


class AdaptError(ValueError):
    """The labelled images or the bundle cannot be used for adaptation; the message says why."""


@dataclass
class Refit:
    heads: dict[int, Head]
    gating: dict[str, float]
    report: dict
    data_sha256: str
    seconds: float = 0.0
    lineage: dict = field(default_factory=dict)


def data_digest(items: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (image sha256, label) pairs: which data a bundle was adapted on."""
    h = hashlib.sha256()
    for digest, label in sorted(items):
        h.update(f"{digest} {label}\n".encode())
    return h.hexdigest()


def leave_out_conflicts(fab: FeatureSet, digests: list[str]) -> tuple[FeatureSet, list[str], Conflicts]:
    """The fab's images without those whose labels disagree with another copy's (review/conflicts.py), their
    digests, and the conflicts left out (ids: the images' names, `fab.paths`)."""
    kept, conflicts = split_conflicts(range(len(fab)), key=lambda i: (digests[i], fab.labels[i], fab.paths[i]))
    return fab.take(kept), [digests[i] for i in kept], conflicts


def check_labels(bundle: Bundle, labels: list[str], left_out: int = 0) -> None:
    """Labels a refit can use; `left_out`: how many images were left out because their reviews disagree."""
    if bundle.format != FORMAT:
        raise AdaptError(f"{bundle.root}: a format-{bundle.format.rsplit('/', 1)[-1]} bundle has no separate heads to "
                         "refit; convert the training run again with this version")
    if not labels:
        raise AdaptError("no labelled images to adapt on" + (
            f": all {left_out} are left out because copies of one image are labelled differently (review them "
            "again so they agree)" if left_out else ""))
    unknown = sorted(set(labels) - set(bundle.taxonomy))
    if unknown:
        raise AdaptError(f"labels {unknown} are not classes of the bundle (taxonomy {list(bundle.taxonomy)})")
    if len(set(labels)) < 2:
        raise AdaptError(f"all {len(labels)} images are labelled {labels[0]!r}: adaptation needs at least two classes")


def replay_duplicates(fab: FeatureSet, replay: FeatureSet, digests: list[str]) -> np.ndarray:
    """Indices of fab images that are replay (public training) images: the same content (sha256), or the same
    Stage-2 features (the same pixels in another file: a re-encoded or renamed copy)."""
    if not len(fab) or not len(replay):
        return np.zeros(0, np.int64)
    known = set(replay.digests)
    same_file = np.array([d in known for d in digests], bool)
    a, b = fab.stage2.astype(np.float64), replay.stage2.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    scale = np.maximum((b * b).sum(1)[None, :], 1e-12)
    same_features = (np.maximum(d2, 0.0) / scale).min(axis=1) <= SAME_FEATURES ** 2
    return np.flatnonzero(same_file | same_features)


def head_classes(bundle: Bundle, stage: int, labels: list[str]) -> list[str]:
    """The classes a refitted head outputs: the bundle's, plus any taxonomy class the fab labelled that the
    bundle's head lacks (a class only this fab has, e.g. shorts, is learnt from its labels alone), in
    taxonomy order. A binary Stage 1 stays binary."""
    current = list(bundle.stage_classes[stage])
    if stage == 1 and current == ["defective"]:
        return current
    present = set(current) | {x for x in labels if stage == 1 or x != bundle.clean_label}
    return [c for c in bundle.taxonomy if c in present]


def _targets(bundle: Bundle, stage: int, labels: list[str], classes: list[str]
             ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(classes fitted, row mask, class index per kept row) for one stage's head."""
    if stage == 1 and classes == ["defective"]:
        classes_fit = [bundle.clean_label, "defective"]      # fitted as two classes, stored as a sigmoid
        y = np.array([0 if x == bundle.clean_label else 1 for x in labels])
        return classes_fit, np.ones(len(labels), bool), y
    mask = np.array([x in classes for x in labels])
    pos = {c: i for i, c in enumerate(classes)}
    return classes, mask, np.array([pos[x] for x, m in zip(labels, mask) if m], np.int64)


def fit_stage_head(bundle: Bundle, stage: int, classes: list[str], train: FeatureSet, is_fab: np.ndarray,
                   fab_weight: float, lam: float) -> Head:
    """One stage's head over `classes` on `train`'s features, classes balanced, the rows in `is_fab` weighted
    `fab_weight` (a binary Stage 1 is stored as its one-unit sigmoid)."""
    fitted, mask, y = _targets(bundle, stage, train.labels, classes)
    x = (train.stage1 if stage == 1 else train.stage2)[mask]
    w = balanced_weights(y, len(fitted)) * np.where(is_fab[mask], fab_weight, 1.0)
    head = fit_softmax(x, y, fitted, weights=w, lam=lam)
    return head.as_sigmoid() if classes == ["defective"] else head


def _answers(bundle: Bundle, heads: dict[int, Head], fab: FeatureSet, threshold: float):
    """Stage-1 scores, Stage-2 probabilities and final labels of the fab images under these heads."""
    s1 = stage1_score(heads[1].probs(fab.stage1), heads[1].classes, bundle.clean_label)
    p2 = heads[2].probs(fab.stage2)
    top = np.asarray(heads[2].classes, dtype=object)[p2.argmax(axis=1)]
    final = np.where(is_defective(s1, threshold), top, bundle.clean_label)
    return s1, p2, final


def score(bundle: Bundle, truth: list[str], final, s1, threshold: float) -> dict:
    """Macro-F1 over the classes present, clean specificity and defect recall (numpy, from real answers)."""
    truth_arr = np.asarray(truth, dtype=object)
    present = [c for c in bundle.taxonomy if c in set(truth)]
    index = {c: i for i, c in enumerate(bundle.taxonomy)}
    m = classification_metrics([index[t] for t in truth], [index[f] for f in final], list(bundle.taxonomy))
    f1_present = float(np.mean([m["per_class"][c]["f1"] for c in present]))
    clean = truth_arr == bundle.clean_label
    esc = escape_rate(truth, list(final), bundle.clean_label)
    flagged = is_defective(np.asarray(s1), threshold)
    return {"images": len(truth), "macro_f1": f1_present, "accuracy": m["accuracy"],
            "clean_specificity": float(np.mean(~flagged[clean])) if clean.any() else None,
            "defect_recall": float(np.mean(flagged[~clean])) if (~clean).any() else None,
            "escapes": esc["escapes"], "false_alarms": esc["false_alarms"],
            "per_class_f1": {c: m["per_class"][c]["f1"] for c in present}}


def review_floor_for(confidence: np.ndarray, correct: np.ndarray, target: float, fallback: float) -> float:
    """The lowest floor at which the answers not sent to review (confidence >= floor) are at least `target`
    accurate, out of fold; `fallback` (the bundle's floor) when no floor reaches it."""
    if not len(confidence):
        return fallback
    order = np.argsort(-confidence)
    acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(acc >= target)
    if not len(ok):
        return fallback
    return float(min(max(confidence[order][ok[-1]], 0.0), 0.99))


def _out_of_fold(bundle, fab, replay, classes, fold, k, fab_weight, lam):
    """Stage-1 scores and Stage-2 probabilities of each fab image from heads fitted without its fold."""
    oof = {"s1": np.zeros(len(fab)), "p2": np.zeros((len(fab), len(classes[2])))}
    for f in range(k):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        if not len(te):
            continue
        train = FeatureSet.concat([replay, fab.take(tr)])
        is_fab = np.r_[np.zeros(len(replay), bool), np.ones(len(tr), bool)]
        heads = {n: fit_stage_head(bundle, n, classes[n], train, is_fab, fab_weight, lam) for n in (1, 2)}
        part = fab.take(te)
        oof["s1"][te] = stage1_score(heads[1].probs(part.stage1), heads[1].classes, bundle.clean_label)
        oof["p2"][te] = heads[2].probs(part.stage2)
    return oof


def _oof_final(bundle, oof, stage2_classes, labels, target_recall):
    defective = labels != bundle.clean_label
    threshold = threshold_for_recall(oof["s1"][defective], target_recall) if defective.any() \
        else bundle.stage1_threshold
    top = np.asarray(stage2_classes, dtype=object)[oof["p2"].argmax(axis=1)]
    return threshold, np.where(is_defective(oof["s1"], threshold), top, bundle.clean_label)


def refit(bundle: Bundle, fab: FeatureSet, replay: FeatureSet, digests: list[str], *,
          fab_weight: float | None = None, lam: float = DEFAULT_LAMBDA, folds: int = FOLDS,
          target_recall: float = 0.98, review_accuracy: float = REVIEW_ACCURACY, seed: int = 0) -> Refit:
    """New heads and gating for `bundle` from the fab's labelled features; see the module docstring.
    fab_weight None: chosen among FAB_WEIGHTS by out-of-fold macro-F1."""
    t0 = time.perf_counter()
    fab, digests, conflicts = leave_out_conflicts(fab, digests)
    check_labels(bundle, fab.labels, sum(len(seen) for seen in conflicts.values()))
    dup = replay_duplicates(fab, replay, digests)
    if len(dup):
        raise AdaptError(f"{len(dup)} of {len(fab)} images are the bundle's own public training images (e.g. "
                         f"{fab.paths[dup[0]]}): they teach it nothing about this fab; remove them")
    labels = np.asarray(fab.labels, dtype=object)
    classes = {n: head_classes(bundle, n, fab.labels) for n in (1, 2)}
    stage2_classes = classes[2]
    y_all = np.array([bundle.taxonomy.index(x) for x in fab.labels])
    k = int(max(2, min(folds, np.bincount(y_all).max(initial=0))))
    fold = stratified_folds(y_all, k, seed)

    candidates = FAB_WEIGHTS if fab_weight is None else (fab_weight,)
    tried = {}
    for w in candidates:
        oof = _out_of_fold(bundle, fab, replay, classes, fold, k, w, lam)
        threshold, final = _oof_final(bundle, oof, stage2_classes, labels, target_recall)
        tried[w] = (score(bundle, fab.labels, final, oof["s1"], threshold)["macro_f1"], oof, threshold, final)
    fab_weight = max(candidates, key=lambda w: (round(tried[w][0], 6), -w))      # ties: the smaller weight
    _, oof, threshold, oof_final = tried[fab_weight]

    in_s2 = np.isin(labels, stage2_classes)
    pos = {c: i for i, c in enumerate(stage2_classes)}
    conf = oof["p2"][in_s2].max(axis=1)
    correct = oof["p2"][in_s2].argmax(axis=1) == np.array([pos[x] for x in labels[in_s2]], np.int64)
    floor = review_floor_for(conf, correct, review_accuracy, bundle.stage2_review_floor)

    train = FeatureSet.concat([replay, fab])
    is_fab = np.r_[np.zeros(len(replay), bool), np.ones(len(fab), bool)]
    heads = {n: fit_stage_head(bundle, n, classes[n], train, is_fab, fab_weight, lam) for n in (1, 2)}

    s1_old, _, old_final = _answers(bundle, bundle.heads, fab, bundle.stage1_threshold)
    flagged = is_defective(oof["s1"], threshold)
    report = {
        "images": len(fab), "per_class": {c: int(np.sum(labels == c)) for c in bundle.taxonomy if np.any(labels == c)},
        "stage2_classes": stage2_classes,
        "classes_added": [c for c in stage2_classes if c not in bundle.stage2_classes],
        "replay_images": len(replay), "fab_weight": fab_weight,
        "fab_weights_tried": {f"{w:g}": round(tried[w][0], 4) for w in candidates}, "lambda": lam, "folds": k,
        "target_defect_recall": target_recall, "review_accuracy_target": review_accuracy,
        "gating": {"stage1_threshold": float(threshold), "stage2_review_floor": floor},
        "adapted_cross_validated": {
            **score(bundle, fab.labels, oof_final, oof["s1"], threshold),
            "review_fraction": float(np.mean(needs_review(oof["p2"][flagged].max(axis=1), floor)))
            if flagged.any() else 0.0},
        "current_bundle": score(bundle, fab.labels, old_final, s1_old, bundle.stage1_threshold),
        "conflicts_left_out": conflicts_report(conflicts),
    }
    seconds = time.perf_counter() - t0
    report["fit_seconds"] = round(seconds, 2)
    return Refit(heads=heads, gating={"stage1_threshold": threshold, "stage2_review_floor": floor}, report=report,
                 data_sha256=data_digest(list(zip(digests, fab.labels))), seconds=seconds)
