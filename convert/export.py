"""Keras stage model -> TFLite bytes, one function per variant (EXPORT_FORMATS: name, file suffix, weights,
activations, input; the one table of variants), plus the graph check.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np


class Variant(NamedTuple):
    name: str
    suffix: str          # of the model file: stageN{suffix}.tflite
    weights: str
    activations: str
    input: str
    fidelity: int        # 0: closest to the float Keras model (compare.py reports the variants in this order)


# Every variant, in the order they are exported and listed in a bundle (the deployed int8 first).
EXPORT_FORMATS = (
    Variant("int8", "", "int8", "int8", "uint8 pixels", 3),
    Variant("float16", "_float16", "float16", "float32", "float32 pixels", 1),
    Variant("dynamic", "_dynamic", "int8", "float32", "float32 pixels", 2),
    Variant("float32", "_float32", "float32", "float32", "float32 pixels", 0),
)
VARIANTS = tuple(v.name for v in EXPORT_FORMATS)
BY_FIDELITY = tuple(v.name for v in sorted(EXPORT_FORMATS, key=lambda v: v.fidelity))
_BY_NAME = {v.name: v for v in EXPORT_FORMATS}
# How the int8 variant quantizes the weights of dense (FULLY_CONNECTED) layers; convolutions are always
# per-channel. TensorFlow's converter made dense layers per-channel by default in 2024 without raising the
# op's version (FULLY_CONNECTED stays at version 4), so an interpreter older than that cannot tell it is
# handed something it was never built for: tflite-runtime 2.14 on aarch64 crashes in a per-channel int8
# FULLY_CONNECTED without a bias (deploy/README.md). "per-tensor" runs on every runtime; the default was
# chosen from measurements (README, "Runtime parity").
DENSE_QUANTIZATION = ("per-tensor", "per-channel")
DEFAULT_DENSE_QUANTIZATION = "per-tensor"
# Ops allowed to touch float tensors in a full-integer model: the quantize/dequantize at the edges.
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


def model_filename(stage: int, variant: str) -> str:
    suffix = _BY_NAME[variant].suffix if variant in _BY_NAME else f"_{variant}"
    return f"stage{stage}{suffix}.tflite"


def export_tflite(model, variant: str, representative: np.ndarray | Callable[[], Iterable] | None = None,
                  dense: str = DEFAULT_DENSE_QUANTIZATION) -> bytes:
    """Convert a Keras stage model. `representative` (int8 only): uint8/float array N x H x W x 3 of
    preprocessed pixels, or a generator factory yielding such single-image batches. `dense` (int8 only):
    per-tensor or per-channel weights in FULLY_CONNECTED layers (DENSE_QUANTIZATION)."""
    import tensorflow as tf

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if dense not in DENSE_QUANTIZATION:
        raise ValueError(f"unknown dense quantization {dense!r}; choose from {DENSE_QUANTIZATION}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if representative is None:
            raise ValueError("int8 needs a representative dataset")
        if callable(representative):
            gen = representative
        else:
            images = np.asarray(representative)
            if len(images) == 0:
                raise ValueError("the representative dataset is empty")

            def gen():
                for img in images:
                    yield [img[None].astype(np.float32)]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8   # raw pixels straight from preprocessing
        converter.inference_output_type = tf.int8
        # Measured with TF 2.21: this flag alone makes FULLY_CONNECTED weights per-tensor (one scale) and leaves
        # the convolutions per-channel (tests/test_convert.py checks the scales in the written model).
        converter._experimental_disable_per_channel_quantization_for_dense_layers = dense == "per-tensor"
    return converter.convert()


def float_ops(tflite_model: bytes) -> list[str]:
    """Ops (other than the boundary quantize/dequantize) that read or write a float tensor."""
    from edge_runtime.interpreter import make_interpreter

    interp = make_interpreter(model_content=tflite_model, num_threads=1)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    bad = []
    for op in interp._get_ops_details():  # no public equivalent in LiteRT 2.x
        if op["op_name"] in BOUNDARY_OPS:
            continue
        idx = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(np.dtype(tensors[i]["dtype"]).kind == "f" for i in idx if i in tensors):
            bad.append(f'{op["op_name"]}#{op["index"]}')
    return bad


def io_quantization(tflite_model: bytes) -> dict:
    """Input/output dtype and (scale, zero_point) as the runtime needs them."""
    from edge_runtime.interpreter import make_interpreter

    interp = make_interpreter(model_content=tflite_model, num_threads=1)

    def describe(d):
        scale, zero = d["quantization"]
        return {"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zero)}

    return {"input": describe(interp.get_input_details()[0]), "output": describe(interp.get_output_details()[0])}


def split_stage_model(model, classes: list[str]):
    """A stage model (pixels -> ... -> "gap" -> dense layers) as (backbone, head): the Keras model up to the
    global average pooling, exported to TFLite, and its dense layers as a numpy head over `classes`
    (edge_runtime.head.Head; dropout is inference-time identity and left out)."""
    import keras

    from edge_runtime.head import Head

    try:
        gap = model.get_layer("gap")
    except ValueError:
        raise ValueError(f"{model.name}: no layer named 'gap' (global average pooling) to split the stage at") from None
    backbone = keras.Model(model.inputs, gap.output, name=f"{model.name}_backbone")
    after = model.layers[model.layers.index(gap) + 1:]
    dense = []
    for layer in after:
        if isinstance(layer, keras.layers.Dropout):
            continue
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(f"{model.name}: layer {layer.name!r} ({type(layer).__name__}) after the pooling is not "
                             "a dense layer: the head cannot run in numpy")
        dense.append(layer)
    if not dense:
        raise ValueError(f"{model.name}: no dense layer after the pooling")
    activations = [layer.get_config()["activation"] for layer in dense]
    width = int(gap.output.shape[-1])
    head = Head(np.zeros(width, np.float32), np.ones(width, np.float32),
                [tuple(layer.get_weights()) for layer in dense], activations, tuple(classes))
    return backbone, head
