"""Near-duplicate audit: correlation maths, blocking, flat images, union-find, and the real-data leak check."""
from __future__ import annotations

import csv
import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from train.audit import (FLAT_STD, UnionFind, audit_files, near_duplicate_pairs, read_image, thumbnail,
                         zscore_rows)
from train.config import load_config
from tests.support.paths import shared_data

CFG = load_config()


def smooth(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(small, "L").resize((size, size), Image.Resampling.BICUBIC))


def test_zscore_rows_give_pearson_correlation():
    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    z, flat = zscore_rows(thumbs)
    assert not flat.any()
    want = np.corrcoef(thumbs.reshape(5, -1).astype(float))
    np.testing.assert_allclose(z @ z.T, want, atol=1e-5)


def test_flat_rows_are_zero_and_flagged():
    thumbs = np.stack([np.full((32, 32), 100, np.uint8), smooth(1)])
    thumbs[0, 0, 0] = 101                      # std ~0.03 grey levels: still flat
    z, flat = zscore_rows(thumbs)
    assert flat.tolist() == [True, False] and not z[0].any()
    assert FLAT_STD <= 2.0


def test_pairs_threshold_and_blocking_agree():
    base = [smooth(s) for s in range(40)]
    thumbs = np.stack(base + [np.clip(base[3].astype(int) + 2, 0, 255).astype(np.uint8),   # brightness shift
                              255 - base[7]])                                             # inverted: r = -1
    full = near_duplicate_pairs(thumbs, 0.97, block=1024)
    blocked = near_duplicate_pairs(thumbs, 0.97, block=7)
    assert [(i, j) for i, j, _ in full] == [(i, j) for i, j, _ in blocked] == [(3, 40)]
    assert full[0][2] == pytest.approx(1.0, abs=1e-4)


def test_flat_images_match_only_equal_thumbnails():
    thumbs = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 11, 10, 200)] + [smooth(0)])
    assert [(i, j) for i, j, _ in near_duplicate_pairs(thumbs, 0.97)] == [(0, 2)]


def test_union_find_components():
    uf = UnionFind(6)
    for a, b in [(0, 3), (3, 5), (1, 2)]:
        uf.union(a, b)
    assert uf.components() == [[0, 3, 5], [1, 2], [4]]


def test_union_find_joins_group_roots_so_a_chain_is_one_group():
    """A~C and B~C with A !~ B: one group, whatever the order the pairs arrive in. Joining the two images
    instead of their groups' roots splits it (union(0, 2) then union(1, 2) would re-parent 2 away from 0)."""
    for n, pairs in ((3, [(0, 2), (1, 2)]), (3, [(1, 2), (0, 2)]), (4, [(0, 3), (1, 3), (2, 3)]),
                     (5, [(3, 4), (1, 4), (0, 2), (2, 4)])):
        uf = UnionFind(n)
        for a, b in pairs:
            uf.union(a, b)
        assert uf.components() == [list(range(n))], pairs


def test_a_near_duplicate_chain_is_one_group_in_the_audit(tmp_path):
    """Three real files: A and B each correlate >= 0.97 with C (their mean) but not with each other."""
    base, noise = smooth(20).astype(float), smooth(21).astype(float)
    noise -= noise.mean()
    images = {"a.png": base + 0.2 * noise, "b.png": base - 0.2 * noise, "c.png": base}
    entries = []
    for name, pixels in images.items():
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(tmp_path / name)
        entries.append({"path": str(tmp_path / name), "label": "clean", "source": 0})
    result = audit_files(entries, CFG.audit.near_duplicate_correlation, CFG.audit.max_image_pixels,
                         CFG.audit.max_file_bytes)
    assert [(i, j) for i, j, _ in result.pairs] == [(0, 2), (1, 2)]       # a chain, not a triangle
    assert result.groups == [[0, 1, 2]] and result.group_of == [0, 0, 0]


def test_resized_and_colour_mode_copies_are_found(tmp_path):
    img = Image.fromarray(smooth(5, 120), "L")
    paths = {"orig.png": img, "small_rgb.png": img.resize((48, 48)).convert("RGB"),
             "big_rgba.png": img.resize((300, 300)).convert("RGBA"),
             "jpeg.jpg": img.resize((97, 97)).convert("RGB"), "other.png": Image.fromarray(smooth(6, 120), "L")}
    entries = []
    for name, im in paths.items():
        im.save(tmp_path / name)
        entries.append({"path": str(tmp_path / name), "label": "clean", "source": 0})
    result = audit_files(entries, 0.97, CFG.audit.max_image_pixels, CFG.audit.max_file_bytes)
    assert len(result.groups) == 1
    names = sorted(result.records[i].path.rsplit("/", 1)[1] for i in result.groups[0])
    assert names == ["big_rgba.png", "jpeg.jpg", "orig.png", "small_rgb.png"]


def test_read_image_thumbnail_uses_shared_decode(tmp_path):
    arr = smooth(9, 64)
    Image.fromarray(arr, "L").convert("P").save(tmp_path / "p.png")
    digest, thumb, size = read_image(str(tmp_path / "p.png"), 10**8, 10**9)
    assert size == (64, 64) and thumb.shape == (32, 32)
    assert digest == hashlib.sha256((tmp_path / "p.png").read_bytes()).hexdigest()
    from edge_runtime.preprocess import decode_image
    np.testing.assert_array_equal(thumb, thumbnail(decode_image(tmp_path / "p.png")))


# ---- real data -----------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_hackathon_test_is_mostly_copies_of_phase3(tmp_path, capsys):
    """../shared/data/README.md: 265 of hackathon-test's 296 images are near copies of hackathon-phase3."""
    phase3, test = shared_data("hackathon-phase3"), shared_data("hackathon-test")
    from train.prepare import main
    out = tmp_path / "prep"
    assert main(["--quiet", "--data", str(phase3), "--data", str(test), "--out", str(out)]) == 0
    capsys.readouterr()
    import json
    audit = json.loads((out / "audit.json").read_text())
    cross = audit["counts"]["cross_source_images"]
    n_test_copies = cross[1][0]               # hackathon-test images sharing a group with a phase3 image
    print(f"hackathon-test images in a group with a hackathon-phase3 image: {n_test_copies}")
    assert 260 <= n_test_copies <= 296
    assert audit["sources"][1]["decoded"] == 296

    # Independent leak check on the written split: no near-duplicate pair straddles two splits.
    with (out / "split.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    thumbs = np.stack([read_image(r["path"], 10**8, 10**9)[1] for r in rows])
    pairs = near_duplicate_pairs(thumbs, CFG.audit.near_duplicate_correlation)
    assert pairs, "the real data has near duplicates inside a split"
    assert [(i, j) for i, j, _ in pairs if rows[i]["split"] != rows[j]["split"]] == []
    assert Counter(r["split"] for r in rows)["test"] > 0.1 * len(rows)


@pytest.mark.realdata
def test_real_phase3_internal_duplicates_and_conflicts():
    phase3 = shared_data("hackathon-phase3")
    from train.datasets import scan_source
    scan = scan_source(phase3, CFG)
    entries = [{"path": f.path, "label": f.label, "source": 0} for f in scan.files]
    result = audit_files(entries, CFG.audit.near_duplicate_correlation, CFG.audit.max_image_pixels,
                         CFG.audit.max_file_bytes)
    assert len(result.records) == 1056 and not result.skipped
    conflict_pairs = [(i, j) for i, j, _ in result.pairs if result.records[i].label != result.records[j].label]
    print(f"phase3: {len(result.pairs)} near-duplicate pairs, {len(conflict_pairs)} with different labels")
    # README: "about 36" pairs, 9 with different labels (its counting); ours at the same threshold: 54 / 23.
    assert 30 <= len(result.pairs) <= 80
    assert len(conflict_pairs) >= 9
