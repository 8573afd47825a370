"""One runtime's pass for `python -m convert check` (convert/parity.py), in its own process and Python.

    python -m convert.parity_worker --bundle B --variant V --runtime NAME [--kernels K] [--threads N] LIST

LIST: a text file of image paths, one a line. Each image goes through the edge's preprocessing (decoded once,
resized to each stage's own input size) and both stages (Stage 2 on every image, so both stages are compared
everywhere), with edge_runtime's Inspector and its StageRunners: the models run exactly as on the board, and a
model whose manifest asks for a newer interpreter is refused as on the board. Prints one JSON object on stdout:
    {"status": "ok", "runtime", "distribution", "version", "kernels", "python", "machine", "format",
     "images": [{"path", "stage1": [..], "stage2": [..], "probs1": [..], "probs2": [..], "stage1_ms",
                 "stage2_ms"} | {"path", "error"}]}
or {"status": "refused" | "not installed", "reason": "..."}. stageN: the model's dequantized output (format /2:
the backbone's features, where quantization steps are counted); probsN (format /2 only): the probabilities its
numpy head makes of them, what the labels come from; the times include the head.
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
    from edge_runtime.inspector import Inspector
    from edge_runtime.interpreter import NoInterpreter, RuntimeTooOld, backend_version, load_backend
    from edge_runtime.preprocess import ImageError, to_model_input

    def answer(obj) -> int:
        sys.stdout.write(json.dumps(obj) + "\n")
        return 0

    try:
        load_backend(args.runtime)
    except NoInterpreter as exc:
        return answer({"status": "not installed", "reason": str(exc)})
    try:
        bundle = load_bundle(args.bundle, args.variant, verify_all=False)
        inspector = Inspector(bundle, threads=args.threads, runtime=args.runtime, kernels=args.kernels)
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
            gray = inspector.decode(path)
            pixels = {n: to_model_input(gray, stage.size) for n, stage in inspector.stages.items()}
        except ImageError as exc:
            results.append({"path": path, "error": str(exc)})
            continue
        row = {"path": path}
        for n, stage in inspector.stages.items():
            if not results:          # the first image also warms the interpreters up: not timed
                stage.runner.run(pixels[n])
            t0 = time.perf_counter()
            raw = stage.runner.run(pixels[n])
            probs = None if stage.head is None else stage.head.probs(raw)
            row[f"stage{n}_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"stage{n}"] = [float(s) for s in raw]
            if probs is not None:
                row[f"probs{n}"] = [float(p) for p in probs]
        results.append(row)
    return answer({"status": "ok", "runtime": args.runtime, "distribution": dist, "version": version,
                   "kernels": args.kernels, "python": platform.python_version(), "machine": platform.machine(),
                   "variant": bundle.variant, "format": bundle.format, "images": results})


if __name__ == "__main__":
    sys.exit(main())
