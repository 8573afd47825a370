"""train.synth: deterministic synthetic SEM data that is learnable but not trivially separable."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.preprocess import decode_image, preprocess_file
from train import synth
from train.synth import CLASSES, generate_dataset, image_rng, render

PER_CLASS = 3


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "a"
    counts = generate_dataset(root, per_class=PER_CLASS, seed=7)
    return root, counts


def test_classes_are_the_taxonomy():
    from train.config import load_config
    assert list(CLASSES) == load_config().taxonomy.classes


def test_every_class_folder_holds_exactly_n_pngs(small_set):
    root, counts = small_set
    assert counts == {name: PER_CLASS for name in CLASSES}
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    for name in CLASSES:
        files = sorted((root / name).iterdir())
        assert [f.name for f in files] == [f"{name}_{i:04d}.png" for i in range(PER_CLASS)]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(small_set, tmp_path):
    root, _ = small_set
    again, other = tmp_path / "again", tmp_path / "other"
    generate_dataset(again, per_class=PER_CLASS, seed=7)
    generate_dataset(other, per_class=PER_CLASS, seed=8)
    assert _files(root) == _files(again) == _files(other)
    for rel in _files(root):
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
        assert (root / rel).read_bytes() != (other / rel).read_bytes(), rel


def test_image_i_does_not_depend_on_per_class(small_set, tmp_path):
    """Image i comes from its own generator: a smaller run is a prefix of a larger one."""
    root, _ = small_set
    fewer = tmp_path / "fewer"
    generate_dataset(fewer, per_class=1, seed=7, classes=("bridges",))
    first = "bridges/bridges_0000.png"
    assert [str(p) for p in _files(fewer)] == [first]
    assert (fewer / first).read_bytes() == (root / first).read_bytes()


def test_rerun_with_fewer_removes_only_its_own_stale_files(tmp_path):
    out = tmp_path / "data"
    generate_dataset(out, per_class=3, seed=1, classes=("clean",))
    keep = out / "clean" / "my_notes.txt"
    keep.write_text("not ours")
    generate_dataset(out, per_class=2, seed=1, classes=("clean",))
    assert sorted(p.name for p in (out / "clean").iterdir()) == ["clean_0000.png", "clean_0001.png",
                                                                  "my_notes.txt"]
    assert not list(out.rglob("*.tmp"))


def test_images_decode_through_the_shared_preprocessing(small_set):
    root, _ = small_set
    for name in CLASSES:
        for i in range(PER_CLASS):
            path = root / name / f"{name}_{i:04d}.png"
            gray = decode_image(path)
            # PNG is lossless: the file holds exactly what render() drew.
            assert np.array_equal(gray, render(name, image_rng(7, CLASSES.index(name), i), 128))
            x = preprocess_file(path, 128)
            assert x.shape == (128, 128, 3) and x.dtype == np.uint8
            assert gray.std() > 8, f"{path.name} looks blank"          # a real scene, not a flat frame


@pytest.mark.parametrize("size", [64, 200])
def test_render_other_sizes(size):
    for name in CLASSES:
        img = render(name, np.random.default_rng(3), size)
        assert img.shape == (size, size) and img.dtype == np.uint8


def test_render_rejects_unknown_class_and_tiny_size():
    with pytest.raises(ValueError, match="unknown class"):
        render("dust", np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        render("clean", np.random.default_rng(0), 8)
    with pytest.raises(ValueError, match="per_class"):
        generate_dataset("/nonexistent-never-written", per_class=0)


def test_cli_writes_dataset_and_contact_sheet(tmp_path, capsys):
    from PIL import Image

    from train.__main__ import main as train_main         # the `python -m train synth` dispatch
    out, sheet = tmp_path / "d", tmp_path / "docs" / "sheet.png"
    rc = train_main(["synth", "--out", str(out), "--per-class", "2", "--seed", "5", "--size", "64",
                     "--contact-sheet", str(sheet), "--sheet-columns", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in CLASSES:
        assert f"{name}" in printed and len(list((out / name).glob("*.png"))) == 2
    assert "total" in printed and "16" in printed
    with Image.open(sheet) as img:
        # 8 labelled rows of 64 px tiles, 2 columns after the label column
        assert img.height >= 8 * 64 and img.width >= 2 * 64 + 100
        grid = np.asarray(img.convert("L"))
    label_column = grid[:, :100]
    assert (label_column < 128).sum() > 100            # the class names are drawn


def test_cli_reports_bad_out_and_bad_arguments(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert synth.main(["--out", str(not_a_dir), "--per-class", "1"]) == 1
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "x"), "--per-class", "0"])


# ------------------------------------------------------------------------------ learnable, not trivial


def _box3(a):
    p = np.pad(a, 1, mode="edge")
    a = p[:-2] + p[1:-1] + p[2:]
    return (a[:, :-2] + a[:, 1:-1] + a[:, 2:]) / 9.0


def _features(img: np.ndarray) -> np.ndarray:
    """Hand-made, numpy-only probe: what is left after removing the periodic pattern."""
    a = img.astype(np.float32)
    a = (a - a.mean()) / (a.std() + 1e-6)
    spectrum = np.fft.fft2(a)
    mag = np.abs(spectrum)
    strong = mag >= np.quantile(mag, 0.99)
    feats = [float((mag[strong] ** 2).sum() / (mag ** 2).sum())]
    # scene type: a grating's strong frequencies lie on one line through the origin, a via array's don't
    ky, kx = np.nonzero(np.fft.fftshift(mag) >= np.quantile(mag, 0.998))
    ev = np.linalg.eigvalsh(np.cov(np.stack([ky, kx]).astype(float)))
    feats.append(np.log((ev[1] + 1) / (ev[0] + 1)))
    residual = _box3(_box3(a - np.real(np.fft.ifft2(spectrum * strong))))[4:-4, 4:-4]
    sd = residual.std() + 1e-6
    feats += list(np.percentile(residual, [0.1, 1, 99, 99.9]) / sd)
    for threshold in (3.0, 4.5):
        for sign in (1, -1):                    # bright and dark anomalies: how many, how elongated
            ys, xs = np.nonzero(sign * residual > threshold * sd)
            if len(ys) >= 3:
                ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
                feats += [np.log1p(len(ys)), np.log((ev[1] + 1) / (ev[0] + 1)), np.log(ev[1] + 1)]
            else:
                feats += [np.log1p(len(ys)), 0.0, 0.0]
    return np.array(feats, np.float64)


def _softmax_regression(x, y, classes, steps=800, lr=0.5, l2=1e-3):
    w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


@pytest.fixture(scope="module")
def train_test_images():
    """40 train + 20 test images per class, from disjoint seeds, in memory."""
    def draw(seed, n):
        images, labels = [], []
        for ci, name in enumerate(CLASSES):
            for i in range(n):
                images.append(render(name, image_rng(seed, ci, i), 128))
                labels.append(ci)
        return np.stack(images), np.array(labels)
    return draw(101, 40), draw(202, 20)


def test_classes_are_learnable_from_simple_features(train_test_images):
    (x_train, y_train), (x_test, y_test) = train_test_images
    f_train = np.array([_features(x) for x in x_train])
    f_test = np.array([_features(x) for x in x_test])
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    w, b = _softmax_regression((f_train - mu) / sd, y_train, len(CLASSES))
    accuracy = float((np.argmax((f_test - mu) / sd @ w + b, 1) == y_test).mean())
    # chance is 1/8 = 0.125; this crude probe gets ~0.5, a CNN should do far better
    assert accuracy >= 0.30, f"held-out accuracy {accuracy:.2f}: classes are not learnable"


def test_brightness_alone_does_not_give_the_class_away(train_test_images):
    (x_train, y_train), (x_test, y_test) = train_test_images
    m_train, m_test = x_train.mean((1, 2)), x_test.mean((1, 2))
    centroids = np.array([m_train[y_train == c].mean() for c in range(len(CLASSES))])
    predicted = np.argmin(np.abs(m_test[:, None] - centroids[None]), 1)
    accuracy = float((predicted == y_test).mean())
    assert accuracy <= 0.22, f"mean brightness predicts the class {accuracy:.2f} of the time"
    # clean vs defective by mean brightness: the rank AUC must be near 0.5
    clean, defect = m_test[y_test == 0], m_test[y_test != 0]
    auc = float((defect[:, None] > clean[None]).mean() + 0.5 * (defect[:, None] == clean[None]).mean())
    assert abs(auc - 0.5) <= 0.15, f"clean-vs-defect AUC from brightness alone is {auc:.2f}"


def test_defects_are_small_and_local():
    """A defect changes a small part of the image, not the scene: same scene and noise, with and without."""
    changed = []
    for name in CLASSES[1:]:
        for i in range(6):
            clean, defect = (a.astype(float) for a in synth._render_pair(name, np.random.default_rng(i), 128))
            changed.append(float((np.abs(_box3(defect) - _box3(clean)) > 10).mean()))
    changed = np.array(changed)
    assert np.median(changed) < 0.05, changed                # typically ~1 % of the pixels
    assert np.all(changed < 0.2), changed
    assert np.mean(changed > 0.001) >= 0.85, changed         # and the defect is really drawn (a few faint)
