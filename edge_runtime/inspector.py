"""Two-stage inspection of one image, the API shared by the CLI, the watch service and the benchmarks.

    from edge_runtime.inspector import Inspector
    insp = Inspector("models/demo")                # sha256-checked, interpreters built once
    r = insp.inspect("wafer_0001.png")              # or a numpy array
    r.label, r.stage1_score, r.defect_class, r.confidence, r.review, r.latency_ms

Per image: the shared preprocessing (edge_runtime.preprocess) -> Stage 1, P(defective) against the
manifest's calibrated threshold -> Stage 2 only when defective -> `review` when the Stage-2 top-1
confidence is under the manifest's floor. Interpreters, tensors and input buffers are created once in
the constructor; the per-image path only copies pixels into the already-allocated input tensor.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge_runtime.bundle import Bundle, BundleError, StageSpec, load_bundle
from edge_runtime.gate import is_defective, needs_review
from edge_runtime.interpreter import NoInterpreter, make_interpreter
from edge_runtime.preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODE_MB,
    DEFAULT_MAX_PIXELS,
    preprocess_array,
    preprocess_file,
)


@dataclass
class InspectionResult:
    path: str | None
    label: str                    # final 8-class label: clean or the defect class
    stage1_score: float           # P(defective) from Stage 1
    defect_class: str | None      # None when clean
    confidence: float             # clean: 1 - stage1_score; defective: Stage-2 top-1 probability
    review: bool                  # defective with Stage-2 confidence under the review floor
    latency_ms: float             # preprocessing + both stages, wall clock
    preprocess_ms: float
    stage1_ms: float
    stage2_ms: float | None       # None when Stage 2 was skipped
    stage2_probs: dict[str, float] | None = None   # every Stage-2 class's probability; None when skipped

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["stage2_probs"] is not None:
            d["stage2_probs"] = {c: round(p, 6) for c, p in d["stage2_probs"].items()}
        for k in ("stage1_score", "confidence"):
            d[k] = round(d[k], 6)
        for k in ("latency_ms", "preprocess_ms", "stage1_ms", "stage2_ms"):
            if d[k] is not None:
                d[k] = round(d[k], 3)
        return d


class StageRunner:
    """One TFLite model with its input/output quantization, built and allocated once.

    run(uint8 HxWx3) -> dequantized float32 output vector; invoke_only() re-runs the model on whatever
    is already in the input tensor (for raw-invoke benchmarks).
    """

    def __init__(self, spec: StageSpec, model: bytes, threads: int | None, runtime: str | None,
                 kernels: str = "default"):
        self.spec = spec
        self._model = model    # the interpreter reads from this buffer: keep it alive
        try:
            # Refuses (RuntimeTooOld) an interpreter older than the manifest's min_runtime for this model.
            self.interpreter = make_interpreter(model_content=model, num_threads=threads, backend=runtime,
                                                min_runtime=spec.min_runtime, what=str(spec.path),
                                                reason=spec.min_runtime_reason, kernels=kernels)
        except NoInterpreter:
            raise
        except Exception as exc:    # bytes that match the manifest's sha256 but are no TFLite model
            raise BundleError(f"{spec.path}: not a usable TFLite model: {' '.join(str(exc).split())}") from None
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        self.input_shape = tuple(int(s) for s in inp["shape"])
        if self.input_shape != spec.input.shape:
            raise BundleError(f"{spec.path}: model input shape {self.input_shape} differs from the manifest's "
                              f"{spec.input.shape}")
        self.input_dtype = np.dtype(inp["dtype"])
        self._in_index = inp["index"]
        self._out_index = out["index"]
        # The model's own parameters (the interpreter's, which the manifest records).
        in_scale, in_zero = inp["quantization"]
        out_scale, out_zero = out["quantization"]
        self._in_view = self.interpreter.tensor(self._in_index)   # call it for a fresh view each time
        if self.input_dtype.kind == "f":
            self._in_mode = "float"
        elif self.input_dtype == np.uint8 and in_scale in (0.0, 1.0) and in_zero == 0:
            self._in_mode = "direct"    # raw pixels are already the quantized values
        else:
            self._in_mode = "quantize"
            info = np.iinfo(self.input_dtype)
            self._in_inv_scale = np.float32(1.0 / in_scale)
            self._in_zero = np.float32(in_zero)
            self._in_lo, self._in_hi = info.min, info.max
            self._scratch = np.empty(self.input_shape[1:], np.float32)
        self.output_dtype = np.dtype(out["dtype"])
        self._out_quantized = self.output_dtype.kind in "iu" and out_scale != 0.0
        self._out_scale = np.float32(out_scale)
        self._out_zero = np.float32(out_zero)
        self._out = np.empty(tuple(int(s) for s in out["shape"]), np.float32)

    def set_input(self, pixels: np.ndarray) -> None:
        """Write one uint8 HxWx3 image into the interpreter's input tensor (no new buffers)."""
        if pixels.shape != self.input_shape[1:]:
            raise ValueError(f"expected pixels of shape {self.input_shape[1:]}, got {pixels.shape}")
        # The view is a temporary: no reference to the interpreter's memory survives this call,
        # which invoke() requires.
        if self._in_mode == "direct" or self._in_mode == "float":
            np.copyto(self._in_view()[0], pixels, casting="unsafe")
        else:
            np.multiply(pixels, self._in_inv_scale, out=self._scratch)
            np.add(self._scratch, self._in_zero, out=self._scratch)
            np.rint(self._scratch, out=self._scratch)
            np.clip(self._scratch, self._in_lo, self._in_hi, out=self._scratch)
            np.copyto(self._in_view()[0], self._scratch, casting="unsafe")

    def invoke_only(self) -> None:
        self.interpreter.invoke()

    def output(self) -> np.ndarray:
        """The dequantized output vector (a view of a buffer reused on the next call)."""
        raw = self.interpreter.get_tensor(self._out_index)
        if self._out_quantized:
            np.subtract(raw, self._out_zero, out=self._out, dtype=np.float32)
            np.multiply(self._out, self._out_scale, out=self._out)
        else:
            np.copyto(self._out, raw, casting="unsafe")
        return self._out[0]

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self.set_input(pixels)
        self.interpreter.invoke()
        return self.output()


class Inspector:
    """Load a bundle once; inspect images one at a time."""

    def __init__(self, bundle: str | os.PathLike | Bundle, variant: str | None = None,
                 threads: int | None = None, runtime: str | None = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_decode_mb: float = DEFAULT_MAX_DECODE_MB):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, variant)
        if variant and self.bundle.variant != variant:
            raise BundleError(f"bundle was loaded with variant {self.bundle.variant!r}, not {variant!r}")
        self.threads = threads or os.cpu_count() or 1
        self.runtime = runtime
        self.size = self.bundle.image_size
        self.threshold = self.bundle.stage1_threshold
        self.review_floor = self.bundle.stage2_review_floor
        self.clean_label = self.bundle.clean_label
        self.stage2_classes = self.bundle.stage2_classes
        self.limits = {"max_pixels": max_pixels, "max_bytes": max_bytes, "max_decode_mb": max_decode_mb}
        self.stage1 = StageRunner(self.bundle.stage1, self.bundle.model_bytes(1), self.threads, runtime)
        self.stage2 = StageRunner(self.bundle.stage2, self.bundle.model_bytes(2), self.threads, runtime)
        if self.stage1._out.size != 1:
            raise BundleError(f"{self.bundle.stage1.path}: Stage 1 must have one output (P(defective)), "
                              f"has {self.stage1._out.size}")

    def preprocess(self, source) -> np.ndarray:
        if isinstance(source, np.ndarray):
            return preprocess_array(source, self.size)
        return preprocess_file(source, self.size, **self.limits)

    def inspect(self, source: str | os.PathLike | bytes | np.ndarray, path: str | None = None) -> InspectionResult:
        """Inspect a file path, encoded file bytes or an in-memory image. Raises ImageError for unusable
        images. `path` labels the result (default: the path given as source)."""
        t0 = time.perf_counter()
        pixels = self.preprocess(source)
        t1 = time.perf_counter()
        if path is None and isinstance(source, (str, os.PathLike)):
            path = str(source)
        return self._classify(pixels, t0, t1, path)

    def inspect_pixels(self, pixels: np.ndarray, path: str | None = None) -> InspectionResult:
        """Inspect an already preprocessed uint8 HxWx3 image at the model size."""
        t = time.perf_counter()
        return self._classify(pixels, t, t, path)

    def _classify(self, pixels, t0, t1, path) -> InspectionResult:
        score = float(self.stage1.run(pixels)[0])
        t2 = time.perf_counter()
        if is_defective(score, self.threshold):
            probs = self.stage2.run(pixels)
            top = int(probs.argmax())
            confidence = float(probs[top])
            defect = self.stage2_classes[top]
            t3 = time.perf_counter()
            return InspectionResult(path=path, label=defect, stage1_score=score, defect_class=defect,
                                    confidence=confidence, review=needs_review(confidence, self.review_floor),
                                    latency_ms=(t3 - t0) * 1e3, preprocess_ms=(t1 - t0) * 1e3,
                                    stage1_ms=(t2 - t1) * 1e3, stage2_ms=(t3 - t2) * 1e3,
                                    stage2_probs={c: float(p) for c, p in zip(self.stage2_classes, probs)})
        return InspectionResult(path=path, label=self.clean_label, stage1_score=score, defect_class=None,
                                confidence=1.0 - score, review=False, latency_ms=(t2 - t0) * 1e3,
                                preprocess_ms=(t1 - t0) * 1e3, stage1_ms=(t2 - t1) * 1e3, stage2_ms=None)

    def describe(self) -> str:
        b = self.bundle
        return (f"bundle {b.root} variant {b.variant} input {b.image_size[0]}x{b.image_size[1]} "
                f"threshold {b.stage1_threshold:g} review<{b.stage2_review_floor:g} threads {self.threads} "
                f"runtime {type(self.stage1.interpreter).__module__.split('.')[0]}")
