"""The gate rule (edge_runtime.gate) at exact ties, alone and through every caller.

A tie is the realistic case, not an edge case: the calibrated threshold is one of the validation scores and an
int8 Stage 1 has only 256 possible scores. Defective means score >= threshold; review means confidence < floor.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edge_runtime.gate import is_defective, needs_review
from edge_runtime.inspector import Inspector
from tests.support.bundles import copy_bundle
from tests.support.images import random_images


def below(x: float) -> float:
    return float(np.nextafter(x, -np.inf))


def above(x: float) -> float:
    return float(np.nextafter(x, np.inf))


def test_scalar_ties_and_their_neighbours():
    assert is_defective(0.5, 0.5) is True
    assert is_defective(below(0.5), 0.5) is False
    assert is_defective(above(0.5), 0.5) is True
    assert needs_review(0.6, 0.6) is False
    assert needs_review(below(0.6), 0.6) is True
    assert needs_review(above(0.6), 0.6) is False
    # numpy scalars (an int8 model's dequantized float32 output) give plain bools too: results stay JSON-ready
    assert is_defective(np.float32(0.25), 0.25) is True and needs_review(np.float32(0.25), 0.25) is False


def test_arrays_decide_elementwise_with_ties():
    scores = np.array([0.2, below(0.4), 0.4, above(0.4), 0.9])
    np.testing.assert_array_equal(is_defective(scores, 0.4), [False, False, True, True, True])
    np.testing.assert_array_equal(needs_review(scores, 0.4), [True, True, False, False, False])
    assert is_defective(scores, 0.4).dtype == bool


def test_calibrated_threshold_is_a_score_and_keeps_its_recall():
    """threshold_for_recall returns one of the defective scores; the gate must count that score as defective
    or the calibrated recall is missed on the very set it was calibrated on."""
    from edge_runtime.evaluation import threshold_for_recall

    scores = np.linspace(0.05, 0.95, 50)
    t = threshold_for_recall(scores, 0.98)
    assert t in scores
    assert is_defective(scores, t).mean() == pytest.approx(0.98)


def int8_values(scale: float, zero_point: int) -> np.ndarray:
    """Every score an int8 output with these parameters can produce, dequantized the way the runtime does."""
    return (np.arange(-128, 128, dtype=np.float32) - np.float32(zero_point)) * np.float32(scale)


def test_inspector_int8_score_exactly_at_the_threshold_is_defective(tiny_bundle, tmp_path):
    probe = Inspector(tiny_bundle, threads=1)
    image = random_images(1, seed=11)[0]
    score = probe.inspect(image).stage1_score
    out = probe.bundle.stage1.output
    assert np.float32(score) in int8_values(out.scale, out.zero_point), "not an int8 score"

    at = Inspector(copy_bundle(tiny_bundle, tmp_path / "at", stage1_threshold=score), threads=1)
    r = at.inspect(image)
    assert r.stage1_score == at.threshold == score
    assert r.defect_class is not None and r.stage2_ms is not None, "a score equal to the threshold is defective"

    over = Inspector(copy_bundle(tiny_bundle, tmp_path / "over", stage1_threshold=above(score)), threads=1)
    r = over.inspect(image)
    assert r.label == "clean" and r.stage2_ms is None


def test_inspector_confidence_exactly_at_the_floor_is_not_review(tiny_bundle, tmp_path):
    probe = Inspector(copy_bundle(tiny_bundle, tmp_path / "probe", stage1_threshold=0.0), threads=1)
    image = random_images(1, seed=12)[0]
    confidence = probe.inspect(image).confidence
    out = probe.bundle.stage2.output
    assert np.float32(confidence) in int8_values(out.scale, out.zero_point), "not an int8 confidence"

    at = Inspector(copy_bundle(tiny_bundle, tmp_path / "at", stage1_threshold=0.0,
                               stage2_review_floor=confidence), threads=1)
    r = at.inspect(image)
    assert r.confidence == at.review_floor and r.review is False
    over = Inspector(copy_bundle(tiny_bundle, tmp_path / "over", stage1_threshold=0.0,
                                 stage2_review_floor=above(confidence)), threads=1)
    assert over.inspect(image).review is True


def test_training_metrics_and_report_decide_ties_like_the_runtime():
    from edge_runtime.evaluation import two_stage_labels
    from train.report import stage1_metrics, stage2_metrics

    labels, review = two_stage_labels([0.3, below(0.3)], [[0.6, 0.4], [0.6, 0.4]], 0.3, ["a", "b"],
                                      review_floor=0.6)
    assert list(labels) == ["a", "clean"] and list(review) == [False, False]
    _, review = two_stage_labels([0.3], [[below(0.6), 0.4]], 0.3, ["a", "b"], review_floor=0.6)
    assert list(review) == [True]

    m = stage1_metrics([0.3, 0.3, below(0.3)], [1, 1, 0], 0.3)
    assert m["defect_recall"] == 1.0 and m["accuracy"] == 1.0
    m = stage2_metrics(np.array([[0.6, 0.4], [below(0.6), 0.4]]), [0, 0], ["a", "b"], 0.6)
    assert m["review_fraction"] == 0.5


def test_cross_compare_decides_ties_like_the_runtime():
    from convert.compare import evaluate

    run = SimpleNamespace(stage1_threshold=0.5, clean_label="clean", stage2_classes=["a", "b"],
                          taxonomy=["clean", "a", "b"], stage2_review_floor=0.7)
    p1 = np.array([0.5, below(0.5), 0.5])
    p2 = np.array([[0.7, 0.3], [0.9, 0.1], [0.3, below(0.7)]])
    m = evaluate(p1, p2, ["a", "clean", "b"], run)
    assert m["final_labels"] == ["a", "clean", "b"]
    assert m["stage1"]["accuracy"] == 1.0
    assert m["end_to_end"]["review"] == 1           # only the third: under the floor, not at it


def test_stage1_score_is_the_sigmoid_or_one_minus_p_clean():
    from edge_runtime.gate import stage1_score

    assert stage1_score(np.array([0.7]), ("defective",)) == pytest.approx(0.7)
    probs = np.array([[0.6, 0.1, 0.3], [0.05, 0.9, 0.05]])
    np.testing.assert_allclose(stage1_score(probs, ("bridges", "clean", "vias")), [0.9, 0.1])
    np.testing.assert_allclose(stage1_score(probs, ("clean", "bridges", "vias")), [0.4, 0.95])
