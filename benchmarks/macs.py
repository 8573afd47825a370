"""Multiply-accumulates of a TFLite model, counted from its graph (for the compute roofline).

    CONV_2D            out_H * out_W * out_C * kH * kW * in_C   (filter [out_C, kH, kW, in_C]) * batch
    DEPTHWISE_CONV_2D  out_H * out_W * out_C * kH * kW          (filter [1, kH, kW, out_C]) * batch
    FULLY_CONNECTED    out_features * in_features * rows        (weights [out, in])
    TRANSPOSE_CONV     in_H * in_W * in_C * kH * kW * out_C     (filter [out_C, kH, kW, in_C]) * batch

Every other op (pooling, adds, BN folded into MUL/ADD, activations, quantize...) is not counted; its
name and count are listed under `uncounted_ops` so a reader sees what was left out.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

COUNTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def _shape(tensors: dict, index: int) -> tuple[int, ...]:
    return tuple(int(s) for s in tensors[index]["shape"])


def op_macs(op_name: str, input_shapes: list[tuple[int, ...]], output_shape: tuple[int, ...]) -> int:
    """MACs of one op from its tensor shapes (NHWC activations, TFLite filter layouts)."""
    if op_name == "CONV_2D":
        n, oh, ow, oc = output_shape
        _, kh, kw, ic = input_shapes[1]
        return n * oh * ow * oc * kh * kw * ic
    if op_name == "DEPTHWISE_CONV_2D":
        n, oh, ow, oc = output_shape
        _, kh, kw, _ = input_shapes[1]
        return n * oh * ow * oc * kh * kw
    if op_name == "FULLY_CONNECTED":
        out_features, in_features = input_shapes[1][0], input_shapes[1][-1]
        rows = int(np.prod(output_shape)) // max(out_features, 1)
        return rows * out_features * in_features
    if op_name == "TRANSPOSE_CONV":
        # inputs: (output_shape, filter, input[, bias])
        oc, kh, kw, _ = input_shapes[1]
        n, ih, iw, ic = input_shapes[2]
        return n * ih * iw * ic * kh * kw * oc
    raise ValueError(f"{op_name} is not a counted op")


def count_macs(interpreter) -> dict:
    """Total MACs of an allocated interpreter's graph, per counted op type, and the ops not counted."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    by_op: Counter = Counter()
    op_counts: Counter = Counter()
    uncounted: Counter = Counter()
    for op in interpreter._get_ops_details():  # no public equivalent in LiteRT 2.x
        name = op["op_name"]
        if name == "DELEGATE":   # the XNNPACK node wrapping ops that are listed (and counted) themselves
            continue
        if name not in COUNTED:
            uncounted[name] += 1
            continue
        ins = [_shape(tensors, i) if i >= 0 else () for i in op["inputs"]]
        out = _shape(tensors, op["outputs"][0])
        by_op[name] += op_macs(name, ins, out)
        op_counts[name] += 1
    total = int(sum(by_op.values()))
    return {"macs": total, "gmac": total / 1e9, "by_op": dict(by_op), "counted_ops": dict(op_counts),
            "uncounted_ops": dict(sorted(uncounted.items()))}


def count_macs_file(path, backend: str | None = None) -> dict:
    from edge_runtime.interpreter import make_interpreter

    return count_macs(make_interpreter(model_path=str(path), num_threads=1, backend=backend))
