"""The gate rule, written once: every caller (the Inspector, training metrics and reports, the cross-compare,
the benchmarks, adaptation) decides through these functions.

    Stage-1 score   =  P(defective): a one-unit sigmoid's output, or 1 - P(clean) of a head over more classes
                       (Stage 1 may be trained on all 8 classes and still gate on defective vs clean)
    defective  <=>  Stage-1 score >= the calibrated threshold     (a tie is defective)
    review     <=>  Stage-2 top-1 confidence <  the review floor  (a tie is not sent to review)

Ties are real, not theoretical: the calibrated threshold is one of the validation scores, and int8 scores take
only 256 values. Both functions take a scalar (and return a plain bool, JSON-ready) or an array (and return a
bool array of the same shape).
"""
from __future__ import annotations

import numpy as np


def _plain(result):
    return bool(result) if np.ndim(result) == 0 else result


def stage1_score(probs, classes, clean_label: str = "clean"):
    """P(defective) from Stage 1's output over `classes`: ("defective",) is a sigmoid's P(defective); a head
    that includes the clean class gives 1 - P(clean). probs: (K,) or (N, K)."""
    probs = np.asarray(probs)
    if tuple(classes) == ("defective",):
        return probs[..., 0]
    return 1.0 - probs[..., list(classes).index(clean_label)]


def is_defective(score, threshold):
    """Stage 1's decision: P(defective) at or above the threshold goes on to Stage 2."""
    return _plain(np.greater_equal(score, threshold))


def needs_review(confidence, floor):
    """Stage 2's doubt: a top-1 confidence strictly under the floor is flagged for a person to review."""
    return _plain(np.less(confidence, floor))
