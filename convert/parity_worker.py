"""One runtime's pass for `python -m convert check` (convert/parity.py), in its own process and Python.

    python -m convert.parity_worker --bundle B --variant V --runtime NAME [--kernels K] [--threads N] LIST

LIST: a text file of image paths, one a line. Each image goes through the edge's preprocessing and both
stages (Stage 2 on every image, so both stages are compared everywhere), with edge_runtime's StageRunner:
the models run exactly as on the board, and a model whose manifest asks for a newer interpreter is refused
as on the board. Prints one JSON object on stdout:
    {"status": "ok", "runtime", "distribution", "version", "kernels", "python", "machine",
     "images": [{"path", "stage1": [..], "stage2": [..], "stage1_ms", "stage2_ms"} | {"path", "error"}]}
or {"status": "refused" | "not installed", "reason": "..."}. Scores are the dequantized outputs.
Imports only edge_runtime (no TensorFlow): it runs in an edge-only environment, e.g. tflite-runtime's.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.parity_worker")
    p.add_argument("--bundle", required=True)
    p.add_argument("--variant")
    p.add_argument("--runtime", required=True)
    p.add_argument("--kernels", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("list", help="file with one image path a line")
    args = p.parse_args(argv)

    from edge_runtime.bundle import BundleError, load_bundle
    from edge_runtime.inspector import StageRunner
    from edge_runtime.interpreter import NoInterpreter, RuntimeTooOld, backend_version, load_backend
    from edge_runtime.preprocess import ImageError, preprocess_file

    def answer(obj) -> int:
        sys.stdout.write(json.dumps(obj) + "\n")
        return 0

    try:
        load_backend(args.runtime)
    except NoInterpreter as exc:
        return answer({"status": "not installed", "reason": str(exc)})
    try:
        bundle = load_bundle(args.bundle, args.variant, verify_all=False)
        runners = {n: StageRunner(bundle.stage(n), bundle.model_bytes(n), args.threads, args.runtime, args.kernels)
                   for n in (1, 2)}
    except RuntimeTooOld as exc:
        return answer({"status": "refused", "reason": str(exc)})
    except (BundleError, NoInterpreter) as exc:
        return answer({"status": "error", "reason": str(exc)})
    dist, version = backend_version(args.runtime)
    with open(args.list, encoding="utf-8") as fh:
        paths = [line.rstrip("\n") for line in fh if line.strip()]

    results = []
    for path in paths:
        try:
            pixels = preprocess_file(path, bundle.image_size)
        except ImageError as exc:
            results.append({"path": path, "error": str(exc)})
            continue
        row = {"path": path}
        for n, runner in runners.items():
            if not results:          # the first image also warms the interpreters up: not timed
                runner.run(pixels)
            t0 = time.perf_counter()
            scores = runner.run(pixels)
            row[f"stage{n}_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"stage{n}"] = [float(s) for s in scores]
        results.append(row)
    return answer({"status": "ok", "runtime": args.runtime, "distribution": dist, "version": version,
                   "kernels": args.kernels, "python": platform.python_version(), "machine": platform.machine(),
                   "variant": bundle.variant, "images": results})


if __name__ == "__main__":
    sys.exit(main())
