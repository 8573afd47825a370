"""Pick a TFLite interpreter: LiteRT first, then tflite-runtime, then TensorFlow as a last resort.

With either of the first two installed, TensorFlow is never imported.

A model may need a minimum interpreter version (the bundle manifest's `min_runtime`, written by
`python -m convert` from the model's op versions, see convert/compat.py): make_interpreter refuses an older
interpreter with RuntimeTooOld (one line) instead of running a model it may compute differently or crash on.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re

# (module, attribute path) in order of preference.
BACKENDS = {
    "litert": ("ai_edge_litert.interpreter", "Interpreter"),
    "tflite-runtime": ("tflite_runtime.interpreter", "Interpreter"),
    "tensorflow": ("tensorflow", "lite.Interpreter"),
}
# The pip distributions that provide each backend (the version check reads theirs).
DISTRIBUTIONS = {
    "litert": ("ai-edge-litert", "ai-edge-litert-nightly"),
    "tflite-runtime": ("tflite-runtime", "tflite-runtime-nightly"),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu"),
}
# Which kernels run the model: the runtime's default (LiteRT and TensorFlow apply XNNPACK, also to int8;
# tflite-runtime 2.14 only to float), TFLite's built-in optimized kernels alone, or its reference kernels.
KERNELS = {"default": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


class NoInterpreter(RuntimeError):
    pass


class RuntimeTooOld(NoInterpreter):
    """The interpreter is older than the model needs (or its version cannot be read)."""


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
        backend_version(name)       # read now, with the import (a service may drop privileges afterwards)
        return name, obj
    raise NoInterpreter("no TFLite interpreter found (" + "; ".join(errors) + "). "
                        "Install one: pip install 'ai-edge-litert' (or tflite-runtime).")


def version_key(version: str) -> tuple[int, int, int]:
    """'2.14.0' -> (2, 14, 0); '2.21.0rc1' -> (2, 21, 0); '1.15' -> (1, 15, 0). ValueError if not a version."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(g or 0) for g in match.groups())


_VERSIONS: dict[str, tuple[str, str | None]] = {}


def backend_version(name: str) -> tuple[str, str | None]:
    """(distribution, version) of an importable backend (read once); version None when it cannot be read."""
    if name not in _VERSIONS:
        found = None
        for dist in DISTRIBUTIONS[name]:
            try:
                found = (dist, importlib.metadata.version(dist))
                break
            except Exception:        # not installed under that name, or its metadata unreadable
                continue
        if found is None:
            module = importlib.import_module(BACKENDS[name][0].split(".")[0])
            found = (DISTRIBUTIONS[name][0], getattr(module, "__version__", None))
        _VERSIONS[name] = found
    return _VERSIONS[name]


def check_runtime_version(name: str, min_runtime: dict[str, str] | None, what: str, reason: str = "") -> None:
    """Refuse backend `name` when `min_runtime` (the manifest's, per backend) asks for a newer one."""
    needed = (min_runtime or {}).get(name)
    if not needed:
        return
    dist, have = backend_version(name)
    why = f" ({reason})" if reason else ""
    if have is None:
        raise RuntimeTooOld(f"{what}: needs {dist} >= {needed}{why}, and the installed {dist}'s version cannot be "
                            "read; refusing to run it")
    if version_key(have) < version_key(needed):
        raise RuntimeTooOld(f"{what}: needs {dist} >= {needed}, this is {dist} {have}{why}; refusing to run it "
                            "rather than risk different answers")


def make_interpreter(model_path: str | None = None, model_content: bytes | None = None,
                     num_threads: int | None = None, backend: str | None = None, *,
                     min_runtime: dict[str, str] | None = None, what: str = "model", reason: str = "",
                     kernels: str = "default"):
    """Build and allocate an interpreter. `min_runtime` ({backend: version}): refuse an older backend
    (RuntimeTooOld). `kernels`: default, builtin or reference (KERNELS)."""
    if kernels not in KERNELS:
        raise NoInterpreter(f"unknown kernels {kernels!r}; choose from {list(KERNELS)}")
    name, cls = load_backend(backend)
    check_runtime_version(name, min_runtime, what, reason)
    threads = num_threads or os.cpu_count() or 1
    options = {}
    if kernels != "default":
        resolver = importlib.import_module(cls.__module__).OpResolverType
        options["experimental_op_resolver_type"] = getattr(resolver, KERNELS[kernels])
    interp = cls(model_path=model_path, model_content=model_content, num_threads=threads, **options)
    interp.allocate_tensors()
    return interp
