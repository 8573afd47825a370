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
# Which kernels run the model: the runtime's default (LiteRT and TensorFlow apply XNNPACK, also to int8;
# tflite-runtime 2.14 only to float), TFLite's built-in optimized kernels alone, or its reference kernels.
KERNELS = {"default": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


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
                     num_threads: int | None = None, backend: str | None = None, *,
                     kernels: str = "default"):
    """Build and allocate an interpreter. `kernels`: default, builtin or reference (KERNELS)."""
    if kernels not in KERNELS:
        raise NoInterpreter(f"unknown kernels {kernels!r}; choose from {list(KERNELS)}")
    name, cls = load_backend(backend)
    threads = num_threads or os.cpu_count() or 1
    options = {}
    if kernels != "default":
        resolver = importlib.import_module(cls.__module__).OpResolverType
        options["experimental_op_resolver_type"] = getattr(resolver, KERNELS[kernels])
    interp = cls(model_path=model_path, model_content=model_content, num_threads=threads, **options)
    interp.allocate_tensors()
    return interp
