"""python -m train cross-source: leave-one-source-out folds without leaks, and a real (tiny) run end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from train.cross_source import fold_rows, source_of, summarise
from tests.support.paths import REPO
from tests.support.training import DEFECTS, TINY_PROFILE


def toy_image(label: str, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Independent noise (no two images are near copies) with a class mark at a random place."""
    img = rng.normal(100, 25, (size, size))
    k = int(rng.integers(4, size - 8))
    if label == "bridges":
        img[k:k + 3, :] += 120
    elif label == "cracks":
        img[:, k:k + 3] += 120
    elif label == "opens":
        img[k:k + 8, k:k + 8] -= 90
    return np.clip(img, 0, 255).astype(np.uint8)


def test_source_of_takes_the_longest_root_and_refuses_strangers():
    roots = ["/d/a", "/d/a-more", "/d/a/b"]
    assert source_of("/d/a/x.png", roots) == 0
    assert source_of("/d/a-more/x.png", roots) == 1          # a prefix of the name is not a parent
    assert source_of("/d/a/b/x.png", roots) == 2
    with pytest.raises(ValueError):
        source_of("/elsewhere/x.png", roots)


def test_fold_holds_out_one_source_and_drops_its_near_copies_of_other_sources():
    audit = {"sources": [{"path": "/a"}, {"path": "/b"}],
             "near_duplicate_groups": [
                 {"sources": [0, 1], "members": [{"path": "/a/c/1.png", "source": 0},
                                                 {"path": "/b/c/9.png", "source": 1}]},
                 {"sources": [1], "members": [{"path": "/b/c/7.png", "source": 1},
                                              {"path": "/b/c/8.png", "source": 1}]}]}
    rows = [("/a/c/1.png", "clean", "train"), ("/a/c/2.png", "clean", "val"), ("/a/c/3.png", "clean", "test"),
            ("/b/c/7.png", "clean", "train"), ("/b/c/8.png", "clean", "train"), ("/b/c/9.png", "clean", "test")]
    fold, counts = fold_rows(rows, audit, held_out=1)
    assert sorted(fold) == [("/a/c/1.png", "clean", "train"), ("/a/c/2.png", "clean", "val"),
                            ("/b/c/7.png", "clean", "test"), ("/b/c/8.png", "clean", "test")]
    assert counts == {"test": 2, "left_out_near_copies": 1, "train": 1, "val": 1}
    fold, counts = fold_rows(rows, audit, held_out=0)
    assert ("/a/c/1.png", "clean", "test") not in fold and counts["left_out_near_copies"] == 1
    assert {r[2] for r in fold if r[0].startswith("/b/")} == {"train"}   # b's own test split is not used


def test_summary_reports_trained_class_f1_beside_the_full_macro():
    e2e = {"n": 4, "macro_f1": 0.5, "accuracy": 0.5, "escape_rate": 0.25, "defective": 4, "false_alarms": 1,
           "clean": 2, "review_fraction": 0.1,
           "per_class": {"clean": {"f1": 1.0, "support": 2}, "bridges": {"f1": 0.5, "support": 1},
                         "shorts": {"f1": 0.0, "support": 1}, "vias": {"f1": 0.0, "support": 0}}}
    metrics = {"end_to_end_test": e2e, "stage1": {"test": {"roc_auc": 0.9}}, "stage2": {"test": {"macro_f1": 0.4}}}
    s = summarise(metrics, trained_classes=["clean", "bridges", "vias"])
    assert s["macro_f1_trained_classes"] == pytest.approx(0.75)   # shorts unlearnable, vias absent in test
    assert s["defect_recall"] == pytest.approx(0.75) and s["clean_specificity"] == pytest.approx(0.5)
    assert "macro_f1_trained_classes" not in summarise(metrics)


@pytest.mark.slow
def test_cross_source_run_end_to_end(tmp_path):
    """Two toy sources, one image of B a near copy of one in A: folds train for real, the copy is not tested."""
    rng = np.random.default_rng(0)
    for src in ("src_a", "src_b"):
        for label in ["clean", *DEFECTS]:
            (tmp_path / src / label).mkdir(parents=True)
            for i in range(14):
                Image.fromarray(toy_image(label, rng)).save(tmp_path / src / label / f"{i}.png")
    original = np.asarray(Image.open(tmp_path / "src_a" / "bridges" / "0.png"), np.int16)
    Image.fromarray(np.clip(original + 3, 0, 255).astype(np.uint8)).save(tmp_path / "src_b" / "bridges" / "copy.png")
    cfg = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    cfg["profiles"]["tiny"] = dict(TINY_PROFILE, epochs_finetune=4)
    cfg["models"]["stage1"]["dense_units"] = cfg["models"]["stage2"]["dense_units"] = 16
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    from train.__main__ import main

    rc = main(["cross-source", "--data", str(tmp_path / "src_a"), "--data", str(tmp_path / "src_b"),
               "--out", str(tmp_path / "xs"), "--profile", "tiny", "--weights", "none",
               "--config", str(tmp_path / "tiny.yaml")])
    assert rc == 0
    result = json.loads((tmp_path / "xs" / "cross_source.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["in-distribution (all sources)", "held out: src_a", "held out: src_b"]
    held_a, held_b = result["rows"][1], result["rows"][2]
    assert (held_a["test"], held_a["left_out_near_copies"]) == (55, 1)   # A's original: a copy trains in B
    assert (held_b["test"], held_b["left_out_near_copies"]) == (56, 1)   # B's near copy of A's image
    assert held_b["summary"]["n"] == 56 and held_a["summary"]["n"] == 55
    fold_b = (tmp_path / "xs" / "fold-src_b" / "fold_split.csv").read_text()
    assert "copy.png" not in fold_b and "src_a/bridges/0.png" in fold_b
    for row in result["rows"][1:]:
        metrics = json.loads((tmp_path / "xs" / f"fold-{row['name'].split(': ')[1]}" / "metrics.json").read_text())
        assert row["summary"]["macro_f1"] == metrics["end_to_end_test"]["macro_f1"]
    assert result["gap"] == pytest.approx(result["rows"][0]["summary"]["macro_f1"]
                                          - min(r["summary"]["macro_f1"] for r in result["rows"][1:]))
    assert "| held out: src_b | 56 |" in (tmp_path / "xs" / "cross_source.md").read_text()
