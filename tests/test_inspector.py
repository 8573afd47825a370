"""edge_runtime.bundle + edge_runtime.inspector on tiny bundles: loading, sha256 refusal, gating, quantization."""
from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.inspector import Inspector, StageRunner
from edge_runtime.interpreter import make_interpreter
from edge_runtime.preprocess import ImageError, preprocess_file
from tests.support.bundles import TINY_SIZE, TINY_STAGE2, copy_bundle
from tests.support.images import random_images


def test_bundle_loads_with_manifest_values(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.variant == "int8"
    assert set(b.variants) == {"int8", "float32"}
    assert b.image_size == (TINY_SIZE, TINY_SIZE)
    assert b.stage2_classes == tuple(TINY_STAGE2)
    assert b.clean_label == "clean"
    assert b.stage1_threshold == 0.5 and b.stage2_review_floor == 0.5
    assert b.stage1.input.dtype == "uint8" and b.stage1.output.dtype == "int8"
    assert load_bundle(tiny_bundle, "float32").stage1.file == "stage1_float32.tflite"


def test_sha256_mismatch_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    data = bytearray((b / "stage2.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "stage2.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stage2\.tflite: sha256 mismatch"):
        Inspector(b)


def test_tampered_file_of_other_variant_is_also_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    with open(b / "stage1_float32.tflite", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"stage1_float32\.tflite: sha256 mismatch"):
        load_bundle(b, "int8")


def test_missing_model_file_and_not_a_bundle(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    (b / "stage1.tflite").unlink()
    with pytest.raises(BundleError, match=r"stage1\.tflite: model file listed in the manifest is missing"):
        load_bundle(b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path / "empty")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no variant 'float16'.*available: int8, float32"):
        load_bundle(tiny_bundle, "float16")


def test_malformed_manifest_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    manifest = yaml.safe_load((b / "manifest.yaml").read_text())
    del manifest["gating"]["stage1_threshold"]
    (b / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="stage1_threshold"):
        load_bundle(b)
    manifest["format"] = "something-else/9"
    (b / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match="unsupported bundle format"):
        load_bundle(b)


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(manifest)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def _random_model_bytes(bundle: Path) -> None:
    """Random bytes in place of stage1.tflite, with the manifest's sha256 and size updated to match."""
    import hashlib
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (bundle / "stage1.tflite").write_bytes(data)

    def edit(m):
        m["variants"]["int8"]["stage1"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    _edit_manifest(bundle, edit)


BAD_BUNDLES = {
    "taxonomy entry is a list": (lambda b: _edit_manifest(b, lambda m: m["taxonomy"].append(["x", "y"])),
                                 "taxonomy[8] must be a class name"),
    "input shape holds a string": (lambda b: _edit_manifest(
        b, lambda m: m["variants"]["int8"]["stage1"]["input"].update(shape=[1, "32", 32, 3])),
        'variants.int8.stage1.input.shape[1] must be an integer, got "32"'),
    "input shape holds null": (lambda b: _edit_manifest(
        b, lambda m: m["variants"]["int8"]["stage2"]["input"].update(shape=[1, None, 32, 3])),
        "variants.int8.stage2.input.shape[1] must be an integer, got null"),
    "manifest is not UTF-8": (lambda b: (b / "manifest.yaml").write_bytes(
        (b / "manifest.yaml").read_bytes().replace(b"clean", b"cl\xe9an")), "not UTF-8"),
    "random bytes with a matching sha256": (_random_model_bytes, "not a usable TFLite model"),
    # class names become folder names downstream (export-labels, train prepare): edge_runtime/classnames.py
    "taxonomy class climbs out of a folder": (lambda b: _edit_manifest(b, lambda m: m["taxonomy"].append("../../x")),
                                              "taxonomy[8]: '../../x' is not a class name"),
    "stage-2 class is an absolute path": (lambda b: _edit_manifest(
        b, lambda m: m.update(taxonomy=[*m["taxonomy"][:3], "/etc/x", *m["taxonomy"][4:]],
                              stage2_classes=["bridges", "cracks", "/etc/x"])), "'/etc/x' is not a class name"),
    "class name like a formula": (lambda b: _edit_manifest(b, lambda m: m["taxonomy"].append("=cmd")),
                                  "'=cmd' is not a class name"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_every_bundle_problem_is_exit_2_with_one_clear_line(tiny_bundle, tmp_path, capsys, case):
    from edge_runtime.cli import main

    damage, message = BAD_BUNDLES[case]
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    damage(b)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(img)
    assert main(["--models", str(b), "--threads", "1", str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"edge-inspect: error: {b}") and message in err[0], err


REPLACEMENTS = (None, "text", -3, 2.5, True, [], [1, "a", None], {"k": [None]}, float("nan"), 10**30)


def _mutations(value, path=()):
    """Every (path, replacement): each node of the manifest swapped for each value of REPLACEMENTS."""
    out = [(path, r) for r in REPLACEMENTS]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _mutations(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _mutations(v, path + (i,))
    return out


def test_manifest_fuzz_any_damage_is_a_bundle_error(tiny_bundle, tmp_path):
    """Each node of the manifest in turn replaced by each of a dozen values of other kinds (None, text,
    numbers, lists, mappings, NaN, huge): loading either works or raises BundleError, never anything else."""
    original = yaml.safe_load((tiny_bundle / "manifest.yaml").read_text())
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    failures = []
    for path, replacement in _mutations(original):
        if path[:2] == ("variants", "float32"):
            continue        # read by the same code as variants.int8
        manifest = json.loads(json.dumps(original))
        if path:
            node = manifest
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = replacement
        else:
            manifest = replacement
        (b / "manifest.yaml").write_text(yaml.dump(manifest, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
        try:
            load_bundle(b)
        except BundleError:
            pass
        except Exception as exc:        # noqa: BLE001 - what the test is looking for
            failures.append(f"{'.'.join(map(str, path))} = {replacement!r}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_threshold_zero_sends_everything_to_stage2(tiny_bundle, tmp_path):
    insp = Inspector(copy_bundle(tiny_bundle, tmp_path / "b", stage1_threshold=0.0), threads=1)
    calls = _count_runs(insp.stage2)
    for img in random_images(6):
        r = insp.inspect(img)
        assert r.defect_class in TINY_STAGE2 and r.label == r.defect_class
        assert r.stage2_ms is not None
    assert calls["n"] == 6


def test_threshold_one_skips_stage2(tiny_bundle, tmp_path):
    insp = Inspector(copy_bundle(tiny_bundle, tmp_path / "b", stage1_threshold=1.0), threads=1)
    calls = _count_runs(insp.stage2)
    for img in random_images(6):
        r = insp.inspect(img)
        assert r.label == "clean" and r.defect_class is None and r.stage2_ms is None
        assert r.review is False
        assert r.confidence == pytest.approx(1.0 - r.stage1_score)
    assert calls["n"] == 0, "Stage 2 must not run on clean images"


def test_gating_follows_the_threshold_per_image(tiny_bundle, tmp_path):
    # float32 gives a spread of scores; put the threshold in the middle of them.
    probe = Inspector(tiny_bundle, variant="float32", threads=1)
    images = random_images(12, seed=3)
    scores = sorted(probe.inspect(img).stage1_score for img in images)
    assert scores[0] < scores[-1], "need distinct Stage-1 scores for this test"
    threshold = (scores[5] + scores[6]) / 2
    insp = Inspector(copy_bundle(tiny_bundle, tmp_path / "b", stage1_threshold=threshold),
                     variant="float32", threads=1)
    results = [insp.inspect(img) for img in images]
    for r in results:
        assert (r.defect_class is not None) == (r.stage1_score >= threshold)
    assert sum(r.defect_class is None for r in results) == 6


def test_review_flag_follows_the_floor(tiny_bundle, tmp_path):
    always = Inspector(copy_bundle(tiny_bundle, tmp_path / "a", stage1_threshold=0.0, stage2_review_floor=1.0))
    never = Inspector(copy_bundle(tiny_bundle, tmp_path / "n", stage1_threshold=0.0, stage2_review_floor=0.0))
    for img in random_images(4):
        ra, rn = always.inspect(img), never.inspect(img)
        assert ra.review is True and ra.confidence < 1.0
        assert rn.review is False
        assert ra.confidence == rn.confidence
    # With the floor between confidences, the flag is exactly "confidence < floor".
    conf = never.inspect(random_images(1)[0]).confidence
    mid = Inspector(copy_bundle(tiny_bundle, tmp_path / "m", stage1_threshold=0.0,
                                stage2_review_floor=conf + 1e-6))
    assert mid.inspect(random_images(1)[0]).review is True


def test_outputs_are_dequantized_with_the_model_parameters(tiny_bundle):
    insp = Inspector(tiny_bundle, threads=1)
    pixels = np.random.default_rng(5).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    for stage, runner in ((1, insp.stage1), (2, insp.stage2)):
        ref = make_interpreter(model_path=str(tiny_bundle / f"stage{stage}.tflite"), num_threads=1)
        ref.set_tensor(ref.get_input_details()[0]["index"], pixels[None])
        ref.invoke()
        out = ref.get_output_details()[0]
        scale, zero = out["quantization"]
        assert out["dtype"] == np.int8 and scale > 0
        expected = (ref.get_tensor(out["index"]).astype(np.float32) - zero) * scale
        np.testing.assert_allclose(runner.run(pixels), expected[0], rtol=0, atol=1e-7)
    # int8 and float32 agree on the same image to quantization precision.
    ref32 = Inspector(tiny_bundle, variant="float32", threads=1)
    assert abs(insp.stage1.run(pixels)[0] - ref32.stage1.run(pixels)[0]) < 0.05


def test_uint8_input_with_scale_one_and_zero_point_zero_takes_the_pixels_as_they_are(tiny_bundle):
    insp = Inspector(tiny_bundle, threads=1)
    runner: StageRunner = insp.stage1
    pixels = np.arange(TINY_SIZE * TINY_SIZE * 3, dtype=np.int64).reshape(TINY_SIZE, TINY_SIZE, 3) % 256
    pixels = pixels.astype(np.uint8)
    runner.set_input(pixels)
    index = runner.interpreter.get_input_details()[0]["index"]
    np.testing.assert_array_equal(runner.interpreter.get_tensor(index)[0], pixels)


def _quantized_input_model(lo: float, hi: float, input_type: str) -> bytes:
    """A small model converted with an integer input calibrated on [lo, hi]: the converter picks the input's
    scale and zero point from that range."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    rng = np.random.default_rng(0)

    def representative():
        for _ in range(8):
            yield [rng.uniform(lo, hi, (1, 8, 8, 3)).astype(np.float32)]
        for value in (lo, hi):
            yield [np.full((1, 8, 8, 3), value, np.float32)]
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = getattr(tf, input_type)
    converter.inference_output_type = tf.int8
    return converter.convert()


# (calibration range, input type) -> the input quantization the converter gives it
QUANTIZED_INPUTS = {"int8, scale 0.5, zero point -128": (0.0, 127.5, "int8"),
                    "uint8, scale 1, zero point 20": (-20.0, 235.0, "uint8"),
                    "uint8, scale 2, zero point 0": (0.0, 510.0, "uint8")}


@pytest.fixture(scope="module")
def quantized_input_models():
    pytest.importorskip("tensorflow")
    return {name: _quantized_input_model(*args) for name, args in QUANTIZED_INPUTS.items()}


@pytest.mark.parametrize("name", QUANTIZED_INPUTS)
def test_quantized_input_uses_the_models_scale_and_zero_point(quantized_input_models, name):
    """Through the constructor, as a bundle's model would come: the runner reads the input quantization from
    the model and quantizes raw pixels with it (then the model's output is what it gives for that input)."""
    from convert.export import io_quantization
    from edge_runtime.bundle import StageSpec, TensorSpec

    data = quantized_input_models[name]
    q = io_quantization(data)
    scale, zero, dtype = q["input"]["scale"], q["input"]["zero_point"], np.dtype(q["input"]["dtype"])
    assert (dtype.name, scale, zero) == {"int8, scale 0.5, zero point -128": ("int8", 0.5, -128),
                                         "uint8, scale 1, zero point 20": ("uint8", 1.0, 20),
                                         "uint8, scale 2, zero point 0": ("uint8", 2.0, 0)}[name]
    specs = {k: TensorSpec(name=v["name"], shape=tuple(v["shape"]), dtype=v["dtype"], scale=v["scale"],
                           zero_point=v["zero_point"]) for k, v in q.items()}
    spec = StageSpec(stage=1, file="m.tflite", path=Path("m.tflite"), sha256="", bytes=len(data),
                     input=specs["input"], output=specs["output"])
    runner = StageRunner(spec, data, threads=1, runtime=None)
    pixels = (np.arange(8 * 8 * 3) * 37 % 256).astype(np.uint8).reshape(8, 8, 3)
    pixels.flat[:4] = (0, 255, 127, 128)
    info = np.iinfo(dtype)
    expected = np.clip(np.rint(pixels / scale + zero), info.min, info.max).astype(dtype)
    assert not np.array_equal(expected, pixels.astype(dtype))      # the quantization changes the values

    runner.set_input(pixels)
    index = runner.interpreter.get_input_details()[0]["index"]
    np.testing.assert_array_equal(runner.interpreter.get_tensor(index)[0], expected)

    ref = make_interpreter(model_content=data, num_threads=1)
    ref.set_tensor(ref.get_input_details()[0]["index"], expected[None])
    ref.invoke()
    out = ref.get_output_details()[0]
    out_scale, out_zero = out["quantization"]
    want = (ref.get_tensor(out["index"]).astype(np.float32) - np.float32(out_zero)) * np.float32(out_scale)
    np.testing.assert_array_equal(runner.run(pixels), want[0])


def test_path_bytes_and_array_give_the_same_result(tiny_bundle, tmp_path):
    insp = Inspector(tiny_bundle, threads=1)
    img = random_images(1, seed=9, size=70)[0]
    path = tmp_path / "wafer é 1.png"
    Image.fromarray(img).save(path)
    from_path = insp.inspect(path)
    from_bytes = insp.inspect(path.read_bytes())
    from_array = insp.inspect(img)
    assert from_path.path == str(path) and from_bytes.path is None and from_array.path is None
    assert from_path.stage1_score == from_bytes.stage1_score == from_array.stage1_score
    assert from_path.label == from_bytes.label == from_array.label
    # The same pixels as the shared preprocessing gives.
    assert insp.inspect_pixels(preprocess_file(path, TINY_SIZE)).stage1_score == from_path.stage1_score


def test_result_dict_is_json_with_the_documented_fields(tiny_bundle):
    r = Inspector(tiny_bundle, threads=1).inspect(random_images(1)[0], path="x.png")
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("path", "label", "stage1_score", "defect_class", "confidence", "review", "latency_ms"):
        assert key in d
    assert d["path"] == "x.png" and d["latency_ms"] > 0
    assert 0.0 <= d["stage1_score"] <= 1.0 and 0.0 <= d["confidence"] <= 1.0


def test_bad_images_raise_image_error_and_the_inspector_keeps_working(tiny_bundle, tmp_path):
    insp = Inspector(tiny_bundle, threads=1)
    buf = io.BytesIO()
    Image.fromarray(random_images(1, size=64)[0]).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("truncated.png", "empty.png"):
        with pytest.raises(ImageError):
            insp.inspect(tmp_path / name)
    assert insp.inspect(buf.getvalue()).label in ("clean", *TINY_STAGE2)


def test_no_per_image_growth(tiny_bundle, tmp_path):
    insp = Inspector(copy_bundle(tiny_bundle, tmp_path / "b", stage1_threshold=0.0), threads=1)
    interp1, interp2 = insp.stage1.interpreter, insp.stage2.interpreter
    images = random_images(8)
    for img in images * 3:
        insp.inspect(img)
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        for _ in range(25):
            for img in images:
                insp.inspect(img)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 200 inspections"
    assert insp.stage1.interpreter is interp1 and insp.stage2.interpreter is interp2


def _count_runs(runner):
    calls = {"n": 0}
    original = runner.run

    def counted(pixels):
        calls["n"] += 1
        return original(pixels)
    runner.run = counted
    return calls
