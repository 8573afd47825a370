"""Two-stage inspection of one image, the API shared by the CLI, the watch service and the benchmarks.

    from edge_runtime.inspector import Inspector
    insp = Inspector("models/demo")                # sha256-checked, interpreters built once
    r = insp.inspect("wafer_0001.png")              # or a numpy array
    r.label, r.stage1_score, r.defect_class, r.confidence, r.review, r.latency_ms

Per image: the shared preprocessing (edge_runtime.preprocess: decoded once, resized to each stage's own
input size) -> Stage 1, P(defective) (edge_runtime.gate.stage1_score) against the manifest's calibrated
threshold -> Stage 2 only when defective -> `review` when the Stage-2 top-1 confidence is under the
manifest's floor. A stage of a format-/2 bundle is a backbone whose features a numpy head turns into
probabilities (edge_runtime/head.py). Interpreters, tensors and input buffers are created once in the
constructor; the per-image path only copies pixels into the already-allocated input tensor.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from edge_runtime.bundle import Bundle, BundleError, StageSpec, load_bundle
from edge_runtime.gate import is_defective, needs_review, stage1_score
from edge_runtime.head import Head
from edge_runtime.interpreter import NoInterpreter, make_interpreter
from edge_runtime.preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DECODE_MB,
    DEFAULT_MAX_PIXELS,
    decode_for,
    gray_of_array,
    to_model_input,
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


class Stage:
    """One stage as the Inspector runs it: its model (a whole classifier, or a backbone and its numpy head),
    its input size and the classes its probabilities are over."""

    def __init__(self, runner: StageRunner, head: Head | None, classes: tuple[str, ...]):
        self.runner, self.head, self.classes = runner, head, classes
        self.size = runner.input_shape[1:3]

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """The backbone's output (format /2: the feature vector the head reads), a copy."""
        return self.runner.run(pixels).copy()

    def probs(self, pixels: np.ndarray) -> np.ndarray:
        out = self.runner.run(pixels)
        return out if self.head is None else self.head.probs(out)


class Inspector:
    """Load a bundle once; inspect images one at a time."""

    def __init__(self, bundle: str | os.PathLike | Bundle, variant: str | None = None,
                 threads: int | None = None, runtime: str | None = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_decode_mb: float = DEFAULT_MAX_DECODE_MB, kernels: str = "default", trusted_keys=None,
                 board_key=None):
        # trusted_keys: the bundle must be signed by one of them (edge_runtime/signing.py), or (board_key: this
        # board's key) be derived by this board from a bundle signed by one, checked before any model is read;
        # None: no signature needed.
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, variant,
                                                                             trusted_keys=trusted_keys,
                                                                             board_key=board_key)
        if variant and self.bundle.variant != variant:
            raise BundleError(f"bundle was loaded with variant {self.bundle.variant!r}, not {variant!r}")
        self.threads = threads or os.cpu_count() or 1
        self.runtime = runtime
        self.size = self.bundle.image_size          # what an image is decoded for: the largest stage input
        self.threshold = self.bundle.stage1_threshold
        self.review_floor = self.bundle.stage2_review_floor
        self.clean_label = self.bundle.clean_label
        self.stage2_classes = self.bundle.stage2_classes
        self.limits = {"max_pixels": max_pixels, "max_bytes": max_bytes, "max_decode_mb": max_decode_mb}
        b = self.bundle
        # kernels (edge_runtime.interpreter.KERNELS): the runtime's default, or TFLite's builtin / reference
        # kernels alone (the runtime parity check compares them)
        self.stage1 = StageRunner(b.stage1, b.model_bytes(1), self.threads, runtime, kernels)
        self.stage2 = StageRunner(b.stage2, b.model_bytes(2), self.threads, runtime, kernels)
        self.stages = {n: Stage(runner, b.heads.get(n), b.stage_classes[n])
                       for n, runner in ((1, self.stage1), (2, self.stage2))}
        # What makes two bundles' backbone outputs identical for one image (Inspector.inspect_decoded's shared).
        self._backbone_key = {n: (spec.sha256, self.stages[n].size, self.threads, runtime, kernels)
                              for n, spec in ((1, b.stage1), (2, b.stage2))}
        if b.heads.get(1) is None and self.stage1._out.size != 1:
            raise BundleError(f"{b.stage1.path}: Stage 1 must have one output (P(defective)), "
                              f"has {self.stage1._out.size}")

    def decode(self, source, size: tuple[int, int] | None = None) -> "object":
        """An image decoded once (8-bit gray), ready to be resized for each stage; `size` (default: this bundle's
        largest input) is the largest input it will be resized to (another bundle's, when it is shared)."""
        if isinstance(source, np.ndarray):
            return gray_of_array(source)
        return decode_for(source, size or self.size, **self.limits)

    def preprocess(self, source, stage: int = 1) -> np.ndarray:
        """uint8 HxWx3 at the input size of `stage`."""
        return to_model_input(self.decode(source), self.stages[stage].size)

    def inspect(self, source: str | os.PathLike | bytes | np.ndarray, path: str | None = None) -> InspectionResult:
        """Inspect a file path, encoded file bytes or an in-memory image. Raises ImageError for unusable
        images. `path` labels the result (default: the path given as source)."""
        t0 = time.perf_counter()
        gray = self.decode(source)
        if path is None and isinstance(source, (str, os.PathLike)):
            path = str(source)
        return self.inspect_decoded(gray, path, t0)

    def inspect_decoded(self, gray, path: str | None = None, t0: float | None = None,
                        shared: dict | None = None) -> InspectionResult:
        """Inspect an image decode() returned (the watch service decodes once for the current bundle and a shadow
        candidate). t0: when the decode began, so preprocess_ms covers it (default: now). shared: a dict kept for
        this one image across bundles: a backbone already run on it by another bundle (same model file, same
        input size and interpreter settings: the same output) is not run again (an adapted candidate shares its
        parent's backbones, so shadowing it costs its heads)."""
        t0 = time.perf_counter() if t0 is None else t0
        pixels1 = to_model_input(gray, self.stages[1].size)
        t1 = time.perf_counter()
        return self._classify(pixels1, lambda: to_model_input(gray, self.stages[2].size), t0, t1, path, shared)

    def inspect_pixels(self, pixels: np.ndarray, path: str | None = None, pixels2: np.ndarray | None = None
                       ) -> InspectionResult:
        """Inspect already preprocessed uint8 HxWx3 images: `pixels` at Stage 1's input size, `pixels2` at
        Stage 2's (needed only when the two sizes differ)."""
        if pixels2 is None and self.stages[1].size != self.stages[2].size:
            raise ValueError(f"Stage 2 takes {self.stages[2].size}, Stage 1 {self.stages[1].size}: pass pixels2")
        t = time.perf_counter()
        return self._classify(pixels, lambda: pixels if pixels2 is None else pixels2, t, t, path)

    def stage1_score(self, pixels: np.ndarray, shared: dict | None = None) -> float:
        return float(stage1_score(self._probs(1, pixels, shared), self.stages[1].classes, self.clean_label))

    def _probs(self, n: int, pixels: np.ndarray, shared: dict | None) -> np.ndarray:
        stage = self.stages[n]
        if shared is None:
            return stage.probs(pixels)
        key = self._backbone_key[n]
        out = shared.get(key)
        if out is None:
            out = shared[key] = stage.features(pixels)
        return out if stage.head is None else stage.head.probs(out)

    def _classify(self, pixels1, stage2_input, t0, t1, path, shared=None) -> InspectionResult:
        score = self.stage1_score(pixels1, shared)
        t2 = time.perf_counter()
        if is_defective(score, self.threshold):
            pixels2 = pixels1 if self.stages[1].size == self.stages[2].size else stage2_input()
            probs = self._probs(2, pixels2, shared)
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
        sizes = " / ".join(f"{h}x{w}" for h, w in (self.stages[1].size, self.stages[2].size))
        return (f"bundle {b.root} variant {b.variant} input {sizes} "
                f"threshold {b.stage1_threshold:g} review<{b.stage2_review_floor:g} threads {self.threads} "
                f"runtime {type(self.stage1.interpreter).__module__.split('.')[0]}")
