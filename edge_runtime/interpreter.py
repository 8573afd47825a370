"""Pick a TFLite interpreter: LiteRT first, then tflite-runtime, then TensorFlow as a last resort.

With either of the first two installed, TensorFlow is never imported.
"""
from __future__ import annotations

import importlib
import os

# (module, attribute path) in order of preference.
BACKENDS = {
    "litert": ("ai_edge_litert.interpreter", "Interpreter"),
    "tflite-runtime": ("tflite_runtime.interpreter", "Interpreter"),
    "tensorflow": ("tensorflow", "lite.Interpreter"),
}


class NoInterpreter(RuntimeError):
    pass


def load_backend(preferred: str | None = None):
    """Return (backend name, Interpreter class). `preferred` forces one backend."""
    names = [preferred] if preferred else list(BACKENDS)
    errors = []
    for name in names:
        if name not in BACKENDS:
            raise NoInterpreter(f"unknown runtime {name!r}; choose from {list(BACKENDS)}")
        module_name, attr = BACKENDS[name]
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        for part in attr.split("."):
            obj = getattr(obj, part)
        return name, obj
    raise NoInterpreter("no TFLite interpreter found (" + "; ".join(errors) + "). "
                        "Install one: pip install 'ai-edge-litert' (or tflite-runtime).")


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None,
                     num_threads: int | None = None, backend: str | None = None):
    _, cls = load_backend(backend)
    threads = num_threads or os.cpu_count() or 1
    interp = cls(model_path=model_path, model_content=model_content, num_threads=threads)
    interp.allocate_tensors()
    return interp
