"""Bundle format /2: per-stage input sizes, backbone + numpy head per stage, replay set; the one bundle reader
refuses whatever does not fit, and the Inspector decodes once and resizes per stage."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.head import Head, HeadError
from tests.support.bundles import TAXONOMY, TINY_STAGE2, TINY_V2_SIZES


def _copy(src, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(src, dest)
    return dest


def _edit(bundle, fn):
    m = yaml.safe_load((bundle / "manifest.yaml").read_text())
    fn(m)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))


# ---- the head ---------------------------------------------------------------------------------------------

def _head(rng, d=6, h=5, k=3, act="softmax"):
    return Head(rng.normal(size=d), rng.uniform(0.5, 2, d), [(rng.normal(size=(d, h)), rng.normal(size=h)),
                                                              (rng.normal(size=(h, k)), rng.normal(size=k))],
                ["relu", act], tuple("abc"[:k]) if act == "softmax" else ("a",))


def test_head_computes_standardise_dense_relu_softmax_and_round_trips_its_file():
    rng = np.random.default_rng(0)
    head = _head(rng)
    f = rng.normal(size=(4, 6))
    (w0, b0), (w1, b1) = head.layers
    z = np.maximum(((f - head.mean) * head.inv_scale) @ w0 + b0, 0) @ w1 + b1
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(head.probs(f), expected, rtol=1e-5)
    again = Head.from_bytes(head.to_bytes(), head.activations, list(head.classes))
    np.testing.assert_allclose(again.probs(f), expected, rtol=1e-5)


def test_two_class_softmax_and_its_sigmoid_form_agree():
    rng = np.random.default_rng(1)
    head = _head(rng, k=2)
    f = rng.normal(size=(10, 6))
    np.testing.assert_allclose(head.as_sigmoid().probs(f)[:, 0], head.probs(f)[:, 1], rtol=1e-5)


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.pop("W1"), "do not match"),
    (lambda a: a.update(W0=np.full((6, 5), np.nan)), "not finite"),
    (lambda a: a.update(W0=np.zeros((7, 5))), "do not follow"),
    (lambda a: a.update(mean=np.array(["x"] * 6)), "must hold floats"),
])
def test_a_damaged_head_file_is_refused(damage, message):
    rng = np.random.default_rng(2)
    head = _head(rng)
    with np.load(io.BytesIO(head.to_bytes())) as z:
        arrays = {k: z[k] for k in z.files}
    damage(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(HeadError, match=message):
        Head.from_bytes(buf.getvalue(), head.activations, list(head.classes))


def test_a_pickled_head_is_never_unpickled():
    buf = io.BytesIO()
    np.savez(buf, mean=np.array([object()], dtype=object), scale=np.ones(1), W0=np.ones((1, 2)), b0=np.ones(2))
    with pytest.raises(HeadError, match="not a head file"):
        Head.from_bytes(buf.getvalue(), ["softmax"], ["a", "b"])


# ---- the reader ---------------------------------------------------------------------------------------------

def test_format_2_bundle_loads_with_its_stages(tiny_bundle_v2):
    b = load_bundle(tiny_bundle_v2)
    assert b.format == "sem-inspect-bundle/2"
    big = TINY_V2_SIZES[2]
    assert b.image_sizes == {n: (s, s) for n, s in TINY_V2_SIZES.items()} and b.image_size == (big, big)
    assert b.stage_classes == {1: tuple(TAXONOMY), 2: tuple(TINY_STAGE2)}
    assert b.heads[1].features == b.stage1.output.shape[-1] and b.heads[2].classes == tuple(TINY_STAGE2)
    assert b.replay is not None and b.manifest["replay"]["images"] == 48


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["stages"]["stage2"].update(classes=list(reversed(m["stage2_classes"]))), "differ from stage2_classes"),
    (lambda m: m["stages"]["stage1"].update(classes=["bridges", "cracks"]), "Stage-1 classes must be"),
    (lambda m: m["stages"]["stage1"]["head"].update(sha256="0" * 64), "sha256 mismatch"),
    (lambda m: m["stages"]["stage1"]["head"].update(file="../stage1_head.npz"), "plain file name"),
    (lambda m: m["stages"]["stage2"]["head"].update(activations=["relu", "softmax"]), "do not match 2 layers"),
    (lambda m: m.pop("stages"), "missing key 'stages'"),
    (lambda m: m.update(format="sem-inspect-bundle/3"), "unsupported bundle format"),
    (lambda m: m["replay"].update(sha256="0" * 64), "replay set"),
])
def test_an_inconsistent_format_2_bundle_is_refused(tiny_bundle_v2, tmp_path, edit, message):
    bundle = _copy(tiny_bundle_v2, tmp_path)
    _edit(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_a_head_that_does_not_fit_its_backbone_is_refused(tiny_bundle_v2, tmp_path):
    from edge_runtime.bundle import file_entry

    bundle = _copy(tiny_bundle_v2, tmp_path)
    rng = np.random.default_rng(3)
    wrong = Head(np.zeros(7), np.ones(7), [(rng.normal(size=(7, 3)), np.zeros(3))], ["softmax"], tuple(TINY_STAGE2))
    data = wrong.to_bytes()
    (bundle / "stage2_head.npz").write_bytes(data)
    _edit(bundle, lambda m: m["stages"]["stage2"]["head"].update(file_entry(data), activations=["softmax"]))
    with pytest.raises(BundleError, match="the Stage-2 head takes 7"):
        load_bundle(bundle)


# ---- the runtime ------------------------------------------------------------------------------------------

def test_inspector_decodes_once_and_feeds_each_stage_its_own_size(tiny_bundle_v2, tmp_path, monkeypatch):
    import edge_runtime.inspector as insp_mod
    from edge_runtime.gate import stage1_score
    from edge_runtime.inspector import Inspector
    from edge_runtime.preprocess import preprocess_file

    path = tmp_path / "w.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (70, 90), dtype=np.uint8)).save(path)
    insp = Inspector(tiny_bundle_v2, threads=1)
    insp.threshold = 0.0                 # every image goes on to Stage 2
    decodes = []
    real = insp_mod.decode_for
    monkeypatch.setattr(insp_mod, "decode_for", lambda *a, **k: decodes.append(a) or real(*a, **k))
    sizes = []
    for n in (1, 2):
        runner = insp.stages[n].runner
        orig = runner.run
        monkeypatch.setattr(runner, "run", lambda px, orig=orig: sizes.append(px.shape) or orig(px))
    r = insp.inspect(path)
    assert len(decodes) == 1 and sizes == [(TINY_V2_SIZES[n], TINY_V2_SIZES[n], 3) for n in (1, 2)]
    # the same answers as each stage's backbone + head by hand, at its own size through the one preprocessing
    b = insp.bundle
    p1 = b.heads[1].probs(insp.stages[1].runner.run(preprocess_file(path, TINY_V2_SIZES[1])))
    p2 = b.heads[2].probs(insp.stages[2].runner.run(preprocess_file(path, TINY_V2_SIZES[2])))
    assert r.stage1_score == pytest.approx(float(stage1_score(p1, b.stage_classes[1])), abs=1e-6)
    assert r.defect_class == TINY_STAGE2[int(p2.argmax())] and r.confidence == pytest.approx(float(p2.max()))


def test_inspect_pixels_needs_stage_2_pixels_when_the_sizes_differ(tiny_bundle_v2):
    from edge_runtime.inspector import Inspector

    insp = Inspector(tiny_bundle_v2, threads=1)
    with pytest.raises(ValueError, match="pass pixels2"):
        insp.inspect_pixels(np.zeros((TINY_V2_SIZES[1],) * 2 + (3,), np.uint8))
    r = insp.inspect_pixels(np.zeros((TINY_V2_SIZES[1],) * 2 + (3,), np.uint8),
                            pixels2=np.zeros((TINY_V2_SIZES[2],) * 2 + (3,), np.uint8))
    assert r.label in TAXONOMY


def test_edge_inspect_runs_a_format_2_bundle_from_the_command_line(tiny_bundle_v2, tmp_path, capsys):
    import json

    from edge_runtime.cli import main

    path = tmp_path / "a.png"
    Image.fromarray(np.full((50, 50), 90, np.uint8)).save(path)
    assert main(["--models", str(tiny_bundle_v2), "--json", str(path)]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["label"] in TAXONOMY and 0.0 <= row["stage1_score"] <= 1.0
