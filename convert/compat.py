"""Which interpreter versions can run a converted model: read from the model itself, written into the manifest.

    needs = runtime_needs(tflite_bytes)
    needs.ops          {"CONV_2D": 3, "FULLY_CONNECTED": 4, ...}   builtin operators and their versions
    needs.min_runtime  {"litert": "1.0.1", "tflite-runtime": "2.16.0", "tensorflow": "2.16.0"}
    needs.reason       why the minimum is what it is (one line)

Two sources, the larger wins:
  1. the op versions: TensorFlow's converter computes from every (operator, version) in the graph the oldest
     TensorFlow Lite runtime that has all of them and stores it in the model's `min_runtime_version` metadata
     (its table, tensorflow/lite/tools/versioning/runtime_version.cc); tflite-runtime and tensorflow share
     that numbering.
  2. what op versions do not say: per-channel int8 FULLY_CONNECTED weights. The converter switched dense
     layers to per-channel in 2024 (tensorflow/tflite-micro#2602, May 2024) without raising FULLY_CONNECTED's
     version (it stays 4; 2.16.0, the first TensorFlow of 2024, is asked for: newer ones were not measured),
     so an older runtime takes the model and runs it: tflite-runtime 2.14 on aarch64 crashes in it (measured,
     README "Runtime parity"), and runtimes without support read one scale where there are many.
LiteRT (ai-edge-litert) numbers its releases on its own; its first release (1.0.1) already had everything
TensorFlow 2.18 had, so any TensorFlow-numbered minimum up to 2.18 maps to it; a newer one maps to the
LiteRT that converted the bundle (the oldest one known to run it).

The edge side (edge_runtime.interpreter.check_runtime_version) refuses an interpreter older than the minimum.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.interpreter import version_key

# LiteRT's first release and the TensorFlow version its kernels were taken from.
LITERT_FIRST = "1.0.1"
LITERT_FIRST_HAS_TF = "2.18.0"
# Asked for by per-channel dense layers: the first TensorFlow release of 2024, the year the converter began to
# write them (tflite-runtime has no release after 2.14, so it refuses them).
PER_CHANNEL_DENSE_TF = "2.16.0"


@dataclass
class RuntimeNeeds:
    ops: dict[str, int] = field(default_factory=dict)
    min_runtime: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    def manifest(self) -> dict:
        """The keys written next to a stage's file in manifest.yaml (read by edge_runtime.bundle)."""
        return {"ops": dict(self.ops), "min_runtime": dict(self.min_runtime), "min_runtime_reason": self.reason}


def _schema():
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:      # LiteRT ships the same generated schema (needs the flatbuffers package)
        from ai_edge_litert import schema_py_generated as schema
    return schema


def read_model(data: bytes) -> tuple[dict[str, int], str | None, list[str]]:
    """(builtin op -> highest version, the converter's min_runtime_version or None, per-channel dense ops)."""
    schema = _schema()
    model = schema.Model.GetRootAs(data, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = []
    ops: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())   # the schema keeps codes < 127 in the old field
        name = names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(oc.CustomCode() or b'').decode()}"
        codes.append(name)
        ops[name] = max(ops.get(name, 0), int(oc.Version()))
    min_version = None
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() == b"min_runtime_version":
            raw = model.Buffers(meta.Buffer()).DataAsNumpy()
            if isinstance(raw, np.ndarray):
                min_version = bytes(raw).split(b"\0", 1)[0].decode() or None
    per_channel_dense = []
    graph = model.Subgraphs(0)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if codes[op.OpcodeIndex()] != "FULLY_CONNECTED" or op.InputsLength() < 2:
            continue
        weights = graph.Tensors(op.Inputs(1))
        quant = weights.Quantization()
        if weights.Type() == schema.TensorType.INT8 and quant is not None and quant.ScaleLength() > 1:
            per_channel_dense.append(f"FULLY_CONNECTED#{i}")
    return dict(sorted(ops.items())), min_version, per_channel_dense


def runtime_needs(data: bytes, litert_version: str | None = None) -> RuntimeNeeds:
    """What interpreter versions the model needs (see the module docstring). `litert_version`: the LiteRT that
    converted it (default: the installed ai-edge-litert), used when no older LiteRT is known to suffice."""
    ops, from_ops, per_channel_dense = read_model(data)
    tf_min = from_ops or "1.0.0"
    reasons = [f"op versions: TensorFlow Lite >= {tf_min}" if from_ops else "no min_runtime_version metadata"]
    if per_channel_dense and version_key(PER_CHANNEL_DENSE_TF) > version_key(tf_min):
        tf_min = PER_CHANNEL_DENSE_TF
        reasons.append(f"per-channel int8 dense layers ({len(per_channel_dense)}x FULLY_CONNECTED, not marked by "
                       f"an op version) need >= {PER_CHANNEL_DENSE_TF}; convert with --dense-quantization "
                       "per-tensor for older runtimes")
    if version_key(tf_min) <= version_key(LITERT_FIRST_HAS_TF):
        litert_min = LITERT_FIRST
    else:
        if litert_version is None:
            try:
                litert_version = importlib.metadata.version("ai-edge-litert")
            except importlib.metadata.PackageNotFoundError:
                litert_version = None
        if litert_version is None:
            raise RuntimeError(f"the model needs TensorFlow Lite >= {tf_min}, newer than LiteRT {LITERT_FIRST}'s "
                               "kernels, and no ai-edge-litert is installed to say which LiteRT runs it")
        litert_min = litert_version
        reasons.append(f"newer than LiteRT {LITERT_FIRST}'s kernels (TensorFlow {LITERT_FIRST_HAS_TF}): LiteRT "
                       f">= {litert_min}, the one that converted it")
    return RuntimeNeeds(ops=ops, min_runtime={"litert": litert_min, "tflite-runtime": tf_min, "tensorflow": tf_min},
                        reason="; ".join(reasons))
