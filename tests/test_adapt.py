"""Adaptation: the numpy head fit, the refit from a fab's labels (calibration out of fold, lineage, refusals),
and both commands (`edge-inspect adapt` from the review database, `python -m train adapt` from a folder)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_runtime.adapt.features import FeatureSet, load_replay
from edge_runtime.adapt.fit import balanced_weights, fit_softmax, lbfgs, stratified_folds
from edge_runtime.adapt.refit import AdaptError, data_digest, refit, review_floor_for
from edge_runtime.bundle import BundleError, load_bundle
from tests.support.bundles import TAXONOMY
from tests.support.images import png_bytes
from tests.support.paths import REPO
from tests.support.review import class_png


# ---- the fit ------------------------------------------------------------------------------------------------

def test_lbfgs_finds_the_minimum_of_a_quadratic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    h = a @ a.T + np.eye(8)
    b = rng.normal(size=8)
    x = lbfgs(lambda v: (0.5 * v @ h @ v - b @ v, h @ v - b), np.zeros(8), max_iter=500, gtol=1e-9, ftol=0.0)
    np.testing.assert_allclose(x, np.linalg.solve(h, b), atol=1e-5)


def test_softmax_fit_matches_scipy_on_the_same_objective():
    optimize = pytest.importorskip("scipy.optimize", reason="scipy (via scikit-image, dev extra) is the reference")
    rng = np.random.default_rng(1)
    n, d, k = 300, 12, 3
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + np.eye(k, d)[y] * 2.0
    w = balanced_weights(y, k) * rng.uniform(0.5, 2.0, n)
    lam = 1e-2
    head = fit_softmax(x, y, ["a", "b", "c"], weights=w, lam=lam, max_iter=1000)
    z = (x - head.mean) * head.inv_scale
    wn = w / w.sum()

    def f(theta):
        weight, bias = theta[:d * k].reshape(d, k), theta[d * k:]
        s = z @ weight + bias
        s -= s.max(1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(1, keepdims=True))
        return -(wn * logp[np.arange(n), y]).sum() + 0.5 * lam * (weight ** 2).sum()

    ref = optimize.minimize(f, np.zeros(d * k + k), method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    ours = np.concatenate([head.layers[0][0].ravel(), head.layers[0][1]]).astype(np.float64)
    assert f(ours) <= ref.fun + 1e-6
    ref_p = np.exp(z @ ref.x[:d * k].reshape(d, k) + ref.x[d * k:])
    ref_p /= ref_p.sum(1, keepdims=True)
    np.testing.assert_allclose(head.probs(x), ref_p, atol=2e-3)


def test_stratified_folds_spread_every_class():
    y = np.repeat(np.arange(4), [10, 7, 5, 3])
    fold = stratified_folds(y, 3, seed=0)
    for c in range(4):
        counts = np.bincount(fold[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_review_floor_keeps_what_is_not_reviewed_accurate():
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 0], bool)
    floor = review_floor_for(conf, correct, 0.9, fallback=0.5)
    assert floor == pytest.approx(0.8)                # above 0.8: 3 of 3 right; with 0.7 in: 3 of 4
    assert review_floor_for(conf, np.zeros(6, bool), 0.9, fallback=0.42) == 0.42


# ---- the refit ----------------------------------------------------------------------------------------------

def _fab_like(bundle, replay, n_per_class=12, seed=0, shift=3.0):
    """Features a fab would give: the replay set's class structure, moved to a new place (a new source) and
    made cleanly separable there, so a refit must learn it from the fab's labels."""
    rng = np.random.default_rng(seed)
    labels = [c for c in TAXONOMY for _ in range(n_per_class)]
    d1, d2 = replay.stage1.shape[1], replay.stage2.shape[1]
    centres1, centres2 = rng.normal(size=(8, d1)) * shift, rng.normal(size=(8, d2)) * shift
    idx = np.array([TAXONOMY.index(x) for x in labels])
    s1 = centres1[idx] + rng.normal(size=(len(labels), d1)) * 0.3 + 10
    s2 = centres2[idx] + rng.normal(size=(len(labels), d2)) * 0.3 + 10
    digests = [f"{i:064x}" for i in range(len(labels))]
    return FeatureSet(s1.astype(np.float32), s2.astype(np.float32), labels, [f"img{i}" for i in range(len(labels))]), \
        digests


def test_refit_learns_the_fab_and_calibrates_out_of_fold(tiny_bundle_v2):
    bundle = load_bundle(tiny_bundle_v2)
    replay = load_replay(bundle)
    fab, digests = _fab_like(bundle, replay)
    r = refit(bundle, fab, replay, digests, target_recall=0.95)
    cv, before = r.report["adapted_cross_validated"], r.report["current_bundle"]
    assert cv["macro_f1"] > 0.9 and cv["macro_f1"] > before["macro_f1"] + 0.3
    assert cv["defect_recall"] >= 0.95
    # a class the bundle's Stage 2 lacked (tiny bundle: bridges, cracks, opens) is learnt from the fab's labels
    assert r.report["classes_added"] == ["shorts", "scratches", "vias", "other"]
    assert r.heads[2].classes == tuple(TAXONOMY[1:]) and r.heads[1].classes == tuple(TAXONOMY)
    assert r.data_sha256 == data_digest(list(zip(digests, fab.labels)))
    assert 0.0 <= r.gating["stage1_threshold"] <= 1.0 and 0.0 <= r.gating["stage2_review_floor"] < 1.0
    # the fab's weight is the candidate with the best out-of-fold macro-F1 (ties: the smaller)
    tried = r.report["fab_weights_tried"]
    assert set(tried) == {"4", "10", "30"}
    best = max(tried.values())
    assert r.report["fab_weight"] == min(float(w) for w, f1 in tried.items() if f1 == best)


@pytest.mark.parametrize("change, message", [
    (lambda f, d: (f.take(np.flatnonzero(np.array(f.labels) == "clean")), d[:12]), "at least two classes"),
    (lambda f, d: (FeatureSet(f.stage1, f.stage2, ["dust"] + f.labels[1:], f.paths), d), "not classes of the bundle"),
    # one image under all the labels: every copy is left out, nothing is left to adapt on
    (lambda f, d: (f, [d[0]] * len(d)), "all 96 are left out because copies of one image are labelled differently"),
])
def test_refit_refuses_labels_it_cannot_use(tiny_bundle_v2, change, message):
    bundle = load_bundle(tiny_bundle_v2)
    replay = load_replay(bundle)
    fab, digests = change(*_fab_like(bundle, replay))
    with pytest.raises(AdaptError, match=message):
        refit(bundle, fab, replay, digests)


def test_refit_leaves_out_the_copies_of_an_image_labelled_differently_and_uses_the_rest(tiny_bundle_v2):
    """The same image content under two labels (two reviews that disagree) no longer stops the refit: both
    copies are left out and named in the report; copies that agree are kept."""
    bundle = load_bundle(tiny_bundle_v2)
    replay = load_replay(bundle)
    fab, digests = _fab_like(bundle, replay)
    digests = list(digests)
    digests[13] = digests[0]                    # img0 (clean) and img13 (bridges): one content, two labels
    digests[2] = digests[1]                     # img1 and img2: one content, both clean: agree
    r = refit(bundle, fab, replay, digests)
    assert r.report["images"] == len(fab) - 2
    assert r.report["conflicts_left_out"] == {"conflicts": 1, "images": 2, "items": [
        {"sha256": digests[0], "images": [{"id": "img0", "label": "clean"}, {"id": "img13", "label": "bridges"}]}]}
    kept = [i for i in range(len(fab)) if i not in (0, 13)]
    assert r.data_sha256 == data_digest([(digests[i], fab.labels[i]) for i in kept])


def test_refit_refuses_the_bundles_own_training_images(tiny_bundle_v2):
    bundle = load_bundle(tiny_bundle_v2)
    replay = load_replay(bundle)
    fab, digests = _fab_like(bundle, replay)
    copy = replay.take(np.arange(3))                  # the same pixels in other files: the same features
    mixed = FeatureSet.concat([fab, FeatureSet(copy.stage1, copy.stage2, copy.labels, ["x", "y", "z"])])
    with pytest.raises(AdaptError, match="3 of 99 images are the bundle's own public training images"):
        refit(bundle, mixed, replay, digests + [f"{10 ** 6 + i:064x}" for i in range(3)])
    same_file = list(digests)
    same_file[5] = replay.digests[0]                  # a byte-identical copy of a public image
    with pytest.raises(AdaptError, match="1 of 96 images"):
        refit(bundle, fab, replay, same_file)


def test_format_1_bundles_and_bundles_without_replay_are_refused(tiny_bundle, tiny_bundle_v2, tmp_path):
    import shutil

    with pytest.raises(BundleError, match="no replay set"):
        load_replay(load_bundle(tiny_bundle))
    b = tmp_path / "no-replay"
    shutil.copytree(tiny_bundle_v2, b)
    m = yaml.safe_load((b / "manifest.yaml").read_text())
    m.pop("replay")
    (b / "manifest.yaml").write_text(yaml.safe_dump(m))
    with pytest.raises(BundleError, match="no replay set"):
        load_replay(load_bundle(b))


# ---- the commands -----------------------------------------------------------------------------------------

def _class_folders(root, per_class=6, seed=0):
    """Images whose gray level says their class: a fab set a refit can learn."""
    for k, c in enumerate(TAXONOMY):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{c}_{i}.png").write_bytes(class_png(k, i, seed))
    return root


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, **kw)


def test_train_adapt_writes_a_bundle_that_names_its_parent_and_data(tiny_bundle_v2, tmp_path):
    from edge_runtime.digest import sha256_file

    data = _class_folders(tmp_path / "fab")
    out = tmp_path / "fab-1"
    res = _run(["-m", "train", "adapt", "--from", str(tiny_bundle_v2), "--data", str(data), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert "adapted (cross-validated)" in res.stderr and "current bundle" in res.stderr
    new, parent = load_bundle(out), load_bundle(tiny_bundle_v2)
    assert new.manifest["parent"]["bundle_id"] == parent.bundle_id
    pairs = [(sha256_file(p), p.parent.name) for p in data.rglob("*.png")]
    assert new.manifest["adapted"]["data_sha256"] == data_digest(pairs)
    assert new.stage1.sha256 == parent.stage1.sha256 and new.stage2.sha256 == parent.stage2.sha256  # same backbones
    assert new.heads[2].classes == tuple(TAXONOMY[1:]) and list(new.stage2_classes) == TAXONOMY[1:]
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["images"] == 48 and report["seconds"] > 0      # how long it took: recorded, not judged


def test_train_adapt_leaves_out_one_image_under_two_class_folders(tiny_bundle_v2, tmp_path):
    """A fab folder holding the same image under two class folders (two reviews that disagree): adapt runs on
    the rest and names both paths as left out."""
    data = _class_folders(tmp_path / "fab", per_class=3)
    twin = data / "other" / "bridges_0-again.png"
    twin.write_bytes((data / "bridges" / "bridges_0.png").read_bytes())
    out = tmp_path / "fab-1"
    res = _run(["-m", "train", "adapt", "--from", str(tiny_bundle_v2), "--data", str(data), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["images"] == 24 - 1
    left_out = report["conflicts_left_out"]
    assert (left_out["conflicts"], left_out["images"]) == (1, 2)
    assert sorted((Path(i["id"]).name, i["label"]) for i in left_out["items"][0]["images"]) == \
        [("bridges_0-again.png", "other"), ("bridges_0.png", "bridges")]
    assert "2 image(s) left out" in res.stderr and "bridges_0-again.png" in res.stderr
    assert load_bundle(out).manifest["adapted"]["images"] == 23


@pytest.mark.parametrize("make, message", [
    (lambda root: _class_folders(root, per_class=3) and __import__("shutil").rmtree(root / "bridges") or root,
     None),
    (lambda root: (root / "clean").mkdir(parents=True) or Image.fromarray(np.zeros((9, 9), np.uint8)).save(
        root / "clean" / "a.png") or root, "at least two classes"),
    (lambda root: (root / "dust").mkdir(parents=True) or Image.fromarray(np.zeros((9, 9), np.uint8)).save(
        root / "dust" / "a.png") or root, "dust"),
    (lambda root: root.mkdir() or root, "no usable images"),
])
def test_train_adapt_bad_input_is_one_line_exit_2_and_nothing_written(tiny_bundle_v2, tmp_path, make, message):
    data = make(tmp_path / "fab")
    out = tmp_path / "out"
    res = _run(["-m", "train", "adapt", "--from", str(tiny_bundle_v2), "--data", str(data), "--out", str(out)])
    if message is None:                 # a class missing from the fab's labels is fine
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_train_adapt_refuses_a_bundle_without_replay_or_of_another_taxonomy(tiny_bundle, tiny_bundle_v2, tmp_path):
    import shutil

    data = _class_folders(tmp_path / "fab", per_class=2)
    res = _run(["-m", "train", "adapt", "--from", str(tiny_bundle), "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "no replay set" in res.stderr
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle_v2, other)
    m = yaml.safe_load((other / "manifest.yaml").read_text())
    m["taxonomy"] = ["good", *TAXONOMY[1:]]
    (other / "manifest.yaml").write_text(yaml.safe_dump(m))
    res = _run(["-m", "train", "adapt", "--from", str(other), "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "taxonomy" in res.stderr and not (tmp_path / "o").exists()


def test_edge_inspect_adapt_learns_from_the_reviews_in_the_database(tiny_bundle_v2, tmp_path):
    """The loop on the board: the service records images with the bundle, operators review them, `edge-inspect
    adapt` refits from the database, with only the edge runtime's packages (no TensorFlow imported)."""
    from edge_runtime.config.service_config import load_service_config
    from edge_runtime.db.store import Store
    from edge_runtime.review.reviews import Reviews
    from edge_runtime.service.watch import WatchService

    src = _class_folders(tmp_path / "fab", per_class=5)
    watch = tmp_path / "incoming"
    watch.mkdir()
    truth = {}
    for p in src.rglob("*.png"):
        (watch / p.name).write_bytes(p.read_bytes())
        truth[p.name] = p.parent.name
    cfg = load_service_config(None, {"models": str(tiny_bundle_v2), "watch": str(watch),
                                     "processed": str(tmp_path / "processed"),
                                     "quarantine": str(tmp_path / "quarantine"), "db": str(tmp_path / "r.sqlite3"),
                                     "settle_seconds": 0.0, "threads": 1})
    assert WatchService(cfg).run(once=True) == 0
    reviews = Reviews(Store(tmp_path / "r.sqlite3"), tmp_path / "processed")
    for row in reviews.store.db.execute("SELECT id, name FROM results").fetchall():
        reviews.add(row[0], truth[row[1]], "tester", 0)
    reviews.store.close()
    out = tmp_path / "adapted"
    code = ("import sys; from edge_runtime.cli import main; rc = main(sys.argv[1:]); "
            "assert not any(m.split('.')[0] in ('tensorflow', 'keras', 'train', 'convert') for m in sys.modules); "
            "sys.exit(rc)")
    res = _run(["-c", code, "adapt", "--db", str(tmp_path / "r.sqlite3"), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    new = load_bundle(out)
    assert new.manifest["parent"]["bundle_id"] == load_bundle(tiny_bundle_v2).bundle_id     # the recording bundle
    assert new.manifest["adapted"]["images"] == 40
    first = json.loads((out / "adapt_report.json").read_text())
    assert first["features"] == {"computed": 40, "cached": 0}
    assert "adapt: features 25/40" in res.stderr and "adapt: features 40/40" in res.stderr       # progress lines
    # again after 2 new reviews (a re-review of one image, one more image): only the new image's features are
    # computed, the rest come from the cache beside the database; the heads are the same as from scratch
    (tmp_path / "incoming" / "late.png").write_bytes(png_bytes(999))
    assert WatchService(cfg).run(once=True) == 0
    reviews = Reviews(Store(tmp_path / "r.sqlite3"), tmp_path / "processed")
    (late,) = reviews.store.db.execute("SELECT id FROM results WHERE name = 'late.png'").fetchone()
    reviews.add(late, "cracks", "tester", 0)
    reviews.store.close()
    again = _run(["-m", "edge_runtime.cli", "adapt", "--db", str(tmp_path / "r.sqlite3"), "--out",
                  str(tmp_path / "adapted2"), "--models", str(tiny_bundle_v2)])
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "adapted2" / "adapt_report.json").read_text())
    assert second["features"] == {"computed": 1, "cached": 40}, second["features"]
    assert list((tmp_path / "adapt-cache").glob("features-*.npz"))
    scratch = _run(["-m", "edge_runtime.cli", "adapt", "--db", str(tmp_path / "r.sqlite3"), "--out",
                    str(tmp_path / "adapted3"), "--models", str(tiny_bundle_v2)])
    assert scratch.returncode == 0, scratch.stderr
    for n in (1, 2):           # the cached features give the heads the computed ones give
        a = np.load(tmp_path / "adapted2" / f"stage{n}_head.npz")
        b = np.load(tmp_path / "adapted3" / f"stage{n}_head.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # nothing reviewed: one line, exit 2, nothing written
    empty = tmp_path / "empty.sqlite3"
    Store(empty).close()
    (tmp_path / "processed2").mkdir()
    res = _run(["-m", "edge_runtime.cli", "adapt", "--db", str(empty), "--processed", str(tmp_path / "processed2"),
                "--out", str(tmp_path / "none"), "--models", str(tiny_bundle_v2)])
    assert res.returncode == 2 and "nothing to adapt on" in res.stderr and not (tmp_path / "none").exists()


def test_edge_inspect_adapt_takes_the_database_and_processed_folder_from_the_service_config(tiny_bundle_v2, tmp_path):
    """On an installed board's layout (deploy/service.yaml: db in db/, processed elsewhere) the service records
    the images and `edge-inspect adapt --config` finds them with no other path."""
    from edge_runtime.config.service_config import load_service_config
    from edge_runtime.db.store import Store
    from edge_runtime.review.reviews import Reviews
    from edge_runtime.service.watch import WatchService
    from tests.support.review import installed_board_config

    config = installed_board_config(tmp_path, tiny_bundle_v2)
    cfg = load_service_config(config, {"settle_seconds": 0.0, "threads": 1})
    truth = {}
    for p in _class_folders(tmp_path / "fab", per_class=3).rglob("*.png"):
        (Path(cfg.watch) / p.name).write_bytes(p.read_bytes())
        truth[p.name] = p.parent.name
    assert WatchService(cfg).run(once=True) == 0
    reviews = Reviews(Store(cfg.db), cfg.processed)
    for row in reviews.store.db.execute("SELECT id, name FROM results").fetchall():
        reviews.add(row[0], truth[row[1]], "tester", 0)
    reviews.store.close()
    out = tmp_path / "adapted"
    res = _run(["-m", "edge_runtime.cli", "adapt", "--config", str(config), "--out", str(out), "--threads", "1"])
    assert res.returncode == 0, res.stderr
    assert load_bundle(out).manifest["adapted"]["images"] == len(truth)


def test_edge_inspect_adapt_signs_what_it_derives_with_the_board_key(tiny_bundle_v2, tmp_path):
    """With --board-key the bundle adapt writes runs on a board with trusted_keys (its own key) and no other."""
    pytest.importorskip("cryptography")
    import shutil

    from convert.sign import main as convert_main
    from edge_runtime.config.service_config import load_service_config
    from edge_runtime.db.store import Store
    from edge_runtime.review.reviews import Reviews
    from edge_runtime.service.watch import WatchService
    from edge_runtime.signing import DERIVATION, generate_key

    keys = {name: generate_key(tmp_path / "keys", name)[:2] for name in ("release", "board", "other")}
    parent = Path(shutil.copytree(tiny_bundle_v2, tmp_path / "parent"))
    assert convert_main(["sign", str(parent), "--key", str(keys["release"][0])]) == 0
    watch = tmp_path / "incoming"
    watch.mkdir()
    truth = {}
    for p in _class_folders(tmp_path / "fab", per_class=3).rglob("*.png"):
        (watch / p.name).write_bytes(p.read_bytes())
        truth[p.name] = p.parent.name
    cfg = load_service_config(None, {"models": str(parent), "watch": str(watch), "db": str(tmp_path / "r.sqlite3"),
                                     "processed": str(tmp_path / "processed"), "settle_seconds": 0.0, "threads": 1,
                                     "trusted_keys": str(keys["release"][1])})
    assert WatchService(cfg).run(once=True) == 0
    reviews = Reviews(Store(cfg.db), cfg.processed)
    for row in reviews.store.db.execute("SELECT id, name FROM results").fetchall():
        reviews.add(row[0], truth[row[1]], "tester", 0)
    reviews.store.close()
    out = tmp_path / "adapted"
    res = _run(["-m", "edge_runtime.cli", "adapt", "--db", cfg.db, "--out", str(out), "--threads", "1",
                "--board-key", str(keys["board"][0])])
    assert res.returncode == 0, res.stderr
    assert (out / DERIVATION).is_file()
    b = load_bundle(out, trusted_keys=keys["release"][1], board_key=keys["board"][0])
    assert b.derivation.parent_id == load_bundle(parent).bundle_id and b.manifest["adapted"]["images"] == len(truth)
    with pytest.raises(BundleError, match="another board's key"):
        load_bundle(out, trusted_keys=keys["release"][1], board_key=keys["other"][0])


def test_a_damaged_or_unwritable_feature_cache_costs_time_never_the_adaptation(tiny_bundle_v2, tmp_path):
    """The feature cache is an optimisation: a damaged cache file is ignored and replaced, a folder it cannot be
    written to leaves the adaptation as it would be without one."""
    from edge_runtime.adapt.cache import FeatureCache
    from edge_runtime.adapt.run import adapt

    src = _class_folders(tmp_path / "fab", per_class=3)
    items = [(p, p.parent.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(src.rglob("*.png"))]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    bundle = load_bundle(tiny_bundle_v2)
    FeatureCache(cache_dir, bundle).path.write_bytes(b"not an npz")
    report = adapt(tiny_bundle_v2, items, tmp_path / "a", cache_dir=cache_dir, echo=lambda m: None)
    assert report["features"] == {"computed": len(items), "cached": 0}
    assert len(FeatureCache(cache_dir, bundle).known) == len(items)          # replaced by a good one
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    report = adapt(tiny_bundle_v2, items, tmp_path / "b", cache_dir=blocked / "cache", echo=lambda m: None)
    assert report["features"] == {"computed": len(items), "cached": 0} and load_bundle(tmp_path / "b")
