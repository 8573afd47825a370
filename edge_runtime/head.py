"""A stage's head: the small dense layers applied in numpy to the features its backbone emits.

A stage of a bundle in format /2 is an int8 TFLite backbone (uint8 pixels -> one feature vector, the pooled
last feature map) and a head file: numpy arrays (.npz, no pickle) that standardise the features and apply one
or more dense layers. Heads can be refitted on the fab's own labels in seconds, on the board itself
(edge_runtime/adapt/), without converting the backbone again.

    head.npz   mean (D,), scale (D,), W0 (D, H1), b0 (H1,), W1 (H1, H2), b1 (H2,), ...
    manifest   heads: {stageN: {file, sha256, bytes, classes: [...], activations: [relu, ..., softmax]}}

probs(f) = act_k( ... act_0(((f - mean) / scale) @ W0 + b0) ... ): hidden layers `relu`, the last `softmax`
over `classes` or `sigmoid` (one unit: P(classes[0])).
"""
from __future__ import annotations

import io
import zipfile

import numpy as np

HIDDEN = ("relu",)
OUTPUTS = ("softmax", "sigmoid")
MAX_FEATURES = 16384          # a backbone's pooled features; anything larger is not a head of ours
MAX_UNITS = 4096
MAX_ARRAY_BYTES = 64 * 2**20  # per array, as stored: a compressed entry cannot inflate past this


class HeadError(ValueError):
    """The head file or its description is not usable; the message says why."""


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))       # overflow-free


class Head:
    def __init__(self, mean: np.ndarray, scale: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]],
                 activations: list[str], classes: tuple[str, ...]):
        self.mean = np.asarray(mean, np.float32)
        self.inv_scale = (1.0 / np.asarray(scale, np.float32)).astype(np.float32)
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.activations = list(activations)
        self.classes = tuple(classes)
        self._check()

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    def _check(self) -> None:
        d = self.mean.shape
        if self.mean.ndim != 1 or not 0 < d[0] <= MAX_FEATURES or self.inv_scale.shape != d:
            raise HeadError(f"mean and scale must be vectors of one length (1..{MAX_FEATURES}), got "
                            f"{self.mean.shape} and {self.inv_scale.shape}")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.inv_scale).all()):
            raise HeadError("mean and scale must be finite and scale non-zero")
        if not self.layers or len(self.activations) != len(self.layers):
            raise HeadError(f"{len(self.layers)} dense layers but {len(self.activations)} activations")
        width = d[0]
        for i, ((w, b), act) in enumerate(zip(self.layers, self.activations)):
            last = i == len(self.layers) - 1
            if act not in (OUTPUTS if last else HIDDEN):
                raise HeadError(f"layer {i}: activation {act!r} must be one of {OUTPUTS if last else HIDDEN}")
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],) or not 0 < w.shape[1] <= MAX_UNITS:
                raise HeadError(f"layer {i}: weights {w.shape} / bias {b.shape} do not follow {width} inputs")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise HeadError(f"layer {i}: weights are not finite")
            width = w.shape[1]
        units = self.layers[-1][0].shape[1]
        expected = 1 if self.activations[-1] == "sigmoid" else len(self.classes)
        if units != expected or len(set(self.classes)) != len(self.classes):
            raise HeadError(f"{units} outputs for classes {list(self.classes)} ({self.activations[-1]})")

    def probs(self, features: np.ndarray) -> np.ndarray:
        """(D,) -> (K,) or (N, D) -> (N, K): the probabilities of `classes` (sigmoid: of classes[0])."""
        x = (np.asarray(features, np.float32) - self.mean) * self.inv_scale
        for (w, b), act in zip(self.layers, self.activations):
            x = x @ w + b
            if act == "relu":
                np.maximum(x, 0.0, out=x)
        return softmax(x) if self.activations[-1] == "softmax" else sigmoid(x)

    def as_sigmoid(self) -> "Head":
        """A two-class softmax head as the equivalent one-unit sigmoid over its second class
        (softmax([a, b])[1] = sigmoid(b - a))."""
        if self.activations[-1] != "softmax" or len(self.classes) != 2:
            raise HeadError("only a two-class softmax head has a sigmoid form")
        w, b = self.layers[-1]
        layers = self.layers[:-1] + [(w[:, 1:] - w[:, :1], b[1:] - b[:1])]
        return Head(self.mean, 1.0 / self.inv_scale, layers, self.activations[:-1] + ["sigmoid"], (self.classes[1],))

    # -- the file ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        arrays = {"mean": self.mean, "scale": (1.0 / self.inv_scale).astype(np.float32)}
        for i, (w, b) in enumerate(self.layers):
            arrays[f"W{i}"], arrays[f"b{i}"] = w, b
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, activations: list[str], classes: list[str]) -> "Head":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                names = set(z.files)
                n = len(activations)
                expected = {"mean", "scale"} | {f"{k}{i}" for i in range(n) for k in ("W", "b")}
                if names != expected:
                    raise HeadError(f"arrays {sorted(names)} do not match {n} layers (expected {sorted(expected)})")
                for k in expected:
                    if z.zip.getinfo(f"{k}.npy").file_size > MAX_ARRAY_BYTES:
                        raise HeadError(f"array {k} is larger than {MAX_ARRAY_BYTES >> 20} MB")
                arrays = {k: z[k] for k in expected}
        except HeadError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise HeadError(f"not a head file (.npz without pickles): {exc}") from None
        for k, a in arrays.items():
            if a.dtype.kind != "f":
                raise HeadError(f"array {k} must hold floats, has {a.dtype}")
        return cls(arrays["mean"], arrays["scale"], [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(n)],
                   activations, tuple(classes))
