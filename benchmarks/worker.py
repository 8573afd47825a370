"""One measurement in a fresh process, so its memory numbers are its own:

    python -m benchmarks.worker --spec '{"mode": "stage", ...}' --result out.json

Modes:
    stage      one model file with one runtime (litert, tflite-runtime, keras) and thread count:
               init (construction + allocate_tensors, or Keras load_model), first inference, steady-state
               invoke latencies, RSS after imports / after init / peak, and (TFLite) the graph's MACs
    pipeline   the two-stage pipeline on image streams, one per prevalence: edge_runtime's Inspector for a
               TFLite variant, or the original notebook's path (Keras model.predict per stage) for keras
    paired     Stage 1, Stage 2 (and a light gate) invoked in turn in one process: their ratios, for the
               gate cost model, measured under the same load
    gate       every labelled image through the Inspector's parts, timed one by one: decode, resize to each
               stage's input, Stage 1 (backbone + head), its gate decision at the bundle's threshold, and Stage 2
               (on every image, so its cost is measured on the same images): the gate's real recall and false
               positive rate, and the medians the two-stage vs one-model table is computed from
    build-gate a random-weight MobileNetV3Small Stage 1, exported int8 like the real stages (needs TF)

The result goes to a file, not stdout: TensorFlow's converter writes to stdout from C++. `Workers` is the
parent's side of the same exchange: it writes the spec file, starts this module and reads the result file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.schema import GateResult, PairedResult, PipelineResult, StageResult


# Process CPU time is accounted per scheduler tick on many VMs (4 ms here): over a shorter window a
# single tick dominates, so CPU shares are only reported for windows long enough to average it out.
MIN_CPU_WINDOW_S = 0.25


def cpu_share(cpu_s: float, wall_s: float) -> float | None:
    """CPU seconds per wall second over a timed window, or None when the window is too short to tell."""
    return cpu_s / wall_s if wall_s >= MIN_CPU_WINDOW_S else None


def set_random_input(interp, rng) -> np.ndarray:
    """Fill the model's input once with random values of its own dtype and shape; returns them."""
    import numpy as np  # imported where used: the worker measures RSS before heavy imports

    inp = interp.get_input_details()[0]
    dtype = np.dtype(inp["dtype"])
    shape = tuple(int(s) for s in inp["shape"])
    if dtype.kind == "f":
        x = rng.uniform(0, 255, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    interp.set_tensor(inp["index"], x)
    return x

def memory_mb() -> dict:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in MB."""
    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                status[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    if "VmRSS" not in status:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux
        status = {"VmRSS": None, "VmHWM": peak}
        try:
            import psutil

            status["VmRSS"] = psutil.Process().memory_info().rss / 1024 / 1024
        except ImportError:
            pass
    return {"rss_mb": status.get("VmRSS"), "peak_rss_mb": status.get("VmHWM")}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _timed_loop(fn, runs: int, max_seconds: float, min_runs: int = 5) -> list[float]:
    """Latencies (ms) of up to `runs` calls, stopping early after `max_seconds` once `min_runs` are in."""
    out = []
    start = time.perf_counter()
    while len(out) < runs:
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
        if len(out) >= min_runs and time.perf_counter() - start > max_seconds:
            break
    return out


def _warm_up(fn, min_runs: int = 1, min_seconds: float = 0.3, max_runs: int = 20) -> list[float]:
    """Warm-up runs after the first inference, as benchmark_model's (min runs and seconds); their
    latencies (ms) are reported apart from the steady state."""
    out, start = [], time.perf_counter()
    while len(out) < max_runs and (len(out) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _set_threads_tf(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def stage(spec: dict) -> StageResult:
    import numpy as np

    runtime, threads, model = spec["runtime"], int(spec["threads"]), spec["model"]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if runtime == "keras":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras

        _set_threads_tf(threads)
        version = f"keras {keras.__version__}"
    else:
        from edge_runtime.interpreter import NoInterpreter, load_backend

        try:
            _, cls = load_backend(runtime)
        except NoInterpreter as exc:
            return {"status": "not installed", "reason": str(exc)}
        version = f"{runtime} {getattr(sys.modules.get(cls.__module__.split('.')[0]), '__version__', '?')}"
    import_ms = (time.perf_counter() - t0) * 1e3
    before = memory_mb()

    if runtime == "keras":
        t0 = time.perf_counter()
        net = keras.models.load_model(model, compile=False)
        init_ms = (time.perf_counter() - t0) * 1e3
        shape = tuple(int(s) if s else 1 for s in net.input_shape)
        x = rng.uniform(0, 255, shape).astype(np.float32)
        input_desc = {"shape": list(shape), "dtype": "float32"}

        def infer():   # the original notebook's call: predict on one image at a time
            return net.predict(x, verbose=0)
    else:
        from edge_runtime.interpreter import make_interpreter

        t0 = time.perf_counter()
        interp = make_interpreter(model_path=model, num_threads=threads, backend=runtime)  # + allocate_tensors
        init_ms = (time.perf_counter() - t0) * 1e3
        x = set_random_input(interp, rng)   # as benchmark_model: random input set once, invoke timed
        input_desc = {"shape": list(x.shape), "dtype": x.dtype.name}
        infer = interp.invoke
    after_init = memory_mb()

    t0 = time.perf_counter()
    infer()
    first_ms = (time.perf_counter() - t0) * 1e3
    warmup = _warm_up(infer, min_seconds=float(spec.get("warmup_seconds", 0.3)))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    latencies = _timed_loop(infer, int(spec["runs"]), float(spec["max_seconds"]))
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    end = memory_mb()
    result = {
        "status": "ok", "runtime_version": version, "import_ms": import_ms, "init_ms": init_ms,
        "first_ms": first_ms, "warmup_runs": len(warmup), "warmup_mean_ms": sum(warmup) / len(warmup),
        "latencies_ms": latencies, "input": input_desc,
        "rss_after_import_mb": before["rss_mb"], "rss_after_init_mb": after_init["rss_mb"],
        "rss_end_mb": end["rss_mb"], "peak_rss_mb": end["peak_rss_mb"],
        # CPU seconds of all this process's threads per wall second while timing: about the thread count
        # on an idle machine, lower when other processes take the cores (the latencies are then inflated)
        "cpu_per_wall": cpu_share(cpu_s, wall_s), "load_average": _load(),
        # with one thread: close to the latency the machine would give with nobody else on the core
        "cpu_ms_per_run": cpu_s * 1e3 / len(latencies) if cpu_share(cpu_s, wall_s) is not None else None,
    }
    if runtime != "keras" and spec.get("count_macs", True):
        from benchmarks.macs import count_macs

        result["macs"] = count_macs(interp)
    return result


def _keras_pipeline(spec: dict):
    """The original notebook's path: shared preprocessing, then Keras model.predict per stage."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from edge_runtime.gate import is_defective, stage1_score
    from edge_runtime.preprocess import decode_for, to_model_input

    _set_threads_tf(int(spec["threads"]))
    # From the bundle the parent loaded (edge_runtime.bundle): the same sizes, Stage-1 classes and gating as the
    # Inspector path; decoded once, resized for each stage, as the Inspector does.
    sizes = {int(n): tuple(int(x) for x in hw) for n, hw in spec["image_sizes"].items()}
    largest = max(sizes.values(), key=lambda hw: hw[0] * hw[1])
    classes, clean = tuple(spec["stage1_classes"]), spec.get("clean_label", "clean")
    threshold = float(spec["stage1_threshold"])
    run = Path(spec["keras_run"])
    t0 = time.perf_counter()
    m1 = keras.models.load_model(run / "stage1.keras", compile=False)
    m2 = keras.models.load_model(run / "stage2.keras", compile=False)
    init_ms = (time.perf_counter() - t0) * 1e3

    def inspect(path):
        a = time.perf_counter()
        gray = decode_for(path, largest)
        x1 = to_model_input(gray, sizes[1])[None].astype(np.float32)
        b = time.perf_counter()
        score = float(stage1_score(m1.predict(x1, verbose=0)[0], classes, clean))
        c = time.perf_counter()
        s2 = None
        if is_defective(score, threshold):
            x2 = x1 if sizes[2] == sizes[1] else to_model_input(gray, sizes[2])[None].astype(np.float32)
            m2.predict(x2, verbose=0)
            s2 = (time.perf_counter() - c) * 1e3
        return {"preprocess_ms": (b - a) * 1e3, "stage1_ms": (c - b) * 1e3, "stage2_ms": s2}

    return inspect, init_ms, f"keras {keras.__version__}"


def _inspector_pipeline(spec: dict):
    from edge_runtime.inspector import Inspector

    t0 = time.perf_counter()
    insp = Inspector(spec["bundle"], variant=spec["variant"], threads=int(spec["threads"]),
                     runtime=spec["runtime"])
    init_ms = (time.perf_counter() - t0) * 1e3

    def inspect(path):
        r = insp.inspect(path)
        return {"preprocess_ms": r.preprocess_ms, "stage1_ms": r.stage1_ms, "stage2_ms": r.stage2_ms}

    return inspect, init_ms, insp.describe()


def pipeline(spec: dict) -> PipelineResult:
    from edge_runtime.preprocess import ImageError

    if spec["runtime"] != "keras":
        from edge_runtime.interpreter import NoInterpreter, load_backend

        try:
            load_backend(spec["runtime"])
        except NoInterpreter as exc:
            return {"status": "not installed", "reason": str(exc)}
    before = memory_mb()
    inspect, init_ms, described = (_keras_pipeline if spec["runtime"] == "keras" else _inspector_pipeline)(spec)
    after_init = memory_mb()
    clean_label = spec.get("clean_label", "clean")
    per_prevalence = {}
    for key, items in spec["streams"].items():
        for path, _ in items[: int(spec.get("warmup", 2))]:   # warm caches and lazy init, untimed
            try:
                inspect(path)
            except ImageError:
                pass   # reported by the timed pass below
        records, failures, start, cpu0 = [], [], time.perf_counter(), time.process_time()
        for path, label in items:
            t0 = time.perf_counter()
            try:
                parts = inspect(path)
            except ImageError as exc:   # one unusable image is reported, not fatal
                failures.append({"path": path, "reason": str(exc)})
                continue
            parts["latency_ms"] = (time.perf_counter() - t0) * 1e3
            parts["defective"] = label != clean_label
            parts["flagged"] = parts["stage2_ms"] is not None
            records.append(parts)
            if time.perf_counter() - start > float(spec["max_seconds"]) and len(records) >= 5:
                break
        wall_s = time.perf_counter() - start
        per_prevalence[key] = {"images": len(records), "requested": len(items), "failures": failures,
                               "wall_s": wall_s, "records": records,
                               "cpu_per_wall": cpu_share(time.process_time() - cpu0, wall_s),
                               "load_average": _load()}
    end = memory_mb()
    return {"status": "ok", "runtime_version": described, "init_ms": init_ms,
            "rss_after_import_mb": before["rss_mb"], "rss_after_init_mb": after_init["rss_mb"],
            "rss_end_mb": end["rss_mb"], "peak_rss_mb": end["peak_rss_mb"], "prevalences": per_prevalence}


def gate(spec: dict) -> GateResult:
    """The bundle's gate on labelled images, through the runtime: per image its true label, Stage-1 score and
    decision (edge_runtime.gate, the bundle's threshold) and the time of each part of the pipeline. Stage 2
    runs on every image (timed with its head and, when its input size differs, its own resize), so the
    single-model column and the flagged images' cost come from the same images, interleaved with Stage 1."""
    from edge_runtime.gate import is_defective
    from edge_runtime.interpreter import NoInterpreter, load_backend
    from edge_runtime.preprocess import ImageError, to_model_input

    try:
        load_backend(spec["runtime"])
    except NoInterpreter as exc:
        return {"status": "not installed", "reason": str(exc)}
    from edge_runtime.inspector import Inspector

    insp = Inspector(spec["bundle"], variant=spec["variant"], threads=int(spec["threads"]), runtime=spec["runtime"])
    size1, size2 = insp.stages[1].size, insp.stages[2].size
    clean_label = insp.clean_label

    def one(path):
        t0 = time.perf_counter()
        gray = insp.decode(path)
        t1 = time.perf_counter()
        pixels1 = to_model_input(gray, size1)
        t2 = time.perf_counter()
        score = insp.stage1_score(pixels1)           # backbone + head + gate.stage1_score
        t3 = time.perf_counter()
        pixels2 = pixels1 if size2 == size1 else to_model_input(gray, size2)
        t4 = time.perf_counter()
        insp.stages[2].probs(pixels2)                # backbone + head
        t5 = time.perf_counter()
        return {"score": score, "decode_ms": (t1 - t0) * 1e3, "resize1_ms": (t2 - t1) * 1e3,
                "stage1_ms": (t3 - t2) * 1e3, "resize2_ms": (t4 - t3) * 1e3 if size2 != size1 else None,
                "stage2_ms": (t5 - t4) * 1e3}

    items = spec["items"]
    for path, _ in items[: int(spec.get("warmup", 2))]:     # warm caches and lazy init, untimed
        try:
            one(path)
        except ImageError:
            pass
    records, failures = [], []
    for path, label in items:
        try:
            rec = one(path)
        except ImageError as exc:
            failures.append({"path": path, "reason": str(exc)})
            continue
        rec["defective"] = label != clean_label
        rec["flagged"] = is_defective(rec["score"], insp.threshold)
        records.append(rec)
    return {"status": "ok", "runtime_version": insp.describe(), "threshold": insp.threshold,
            "sizes": {"1": list(size1), "2": list(size2)}, "records": records, "failures": failures,
            "load_average": _load()}


def build_gate(spec: dict) -> dict:
    """Random-weight MobileNetV3Small Stage 1 -> int8 TFLite, exported exactly like the real stages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from convert.export import export_tflite
    from train.models import build_stage_model

    size = int(spec["image_size"])
    model = build_stage_model(1, backbone="mobilenet_v3_small", image_size=size, num_classes=1, weights=None)
    rep = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    data = export_tflite(model, "int8", rep)
    out = Path(spec["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"status": "ok", "model": str(out), "bytes": len(data), "weights": "random (latency only)"}


def paired(spec: dict) -> PairedResult:
    """Several TFLite models in one process, invoked in turn (rotating the order every round), so their
    latency ratios are measured under the same conditions: what the gate cost model needs on a busy machine."""
    import numpy as np

    from edge_runtime.interpreter import NoInterpreter, load_backend, make_interpreter

    try:
        load_backend(spec["runtime"])
    except NoInterpreter as exc:
        return {"status": "not installed", "reason": str(exc)}
    rng = np.random.default_rng(0)
    names = list(spec["models"])
    calls = {}
    for name in names:
        interp = make_interpreter(model_path=spec["models"][name], num_threads=int(spec["threads"]),
                                  backend=spec["runtime"])
        set_random_input(interp, rng)
        interp.invoke()          # first inference
        _warm_up(interp.invoke, min_seconds=0.1)
        calls[name] = interp.invoke
    latencies = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < int(spec["runs"]):
        order = names[rounds % len(names):] + names[: rounds % len(names)]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            latencies[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if rounds >= 5 and time.perf_counter() - start > float(spec["max_seconds"]):
            break
    return {"status": "ok", "rounds": rounds, "latencies_ms": latencies, "load_average": _load()}


MODES = {"stage": stage, "pipeline": pipeline, "build-gate": build_gate, "paired": paired, "gate": gate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON object describing the measurement, or @FILE holding it")
    ap.add_argument("--result", required=True, help="file to write the JSON result to")
    args = ap.parse_args(argv)
    text = args.spec
    if text.startswith("@"):   # large specs (image streams) come in a file: argv has a size limit
        text = Path(text[1:]).read_text(encoding="utf-8")
    spec = json.loads(text)
    try:
        result = MODES[spec["mode"]](spec)
    except Exception as exc:  # reported to the parent, which records it and goes on
        import traceback

        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=5)}
    tmp = Path(args.result + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, args.result)
    return 0 if result.get("status") in ("ok", "not installed") else 1


# ---- the parent's side ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


class Workers:
    """Runs benchmarks.worker in fresh processes; specs and results go through files in a temp folder.
    (subprocess, tempfile and shutil are imported here, not at the top: a worker's memory is measured.)"""

    def __init__(self, timeout: float):
        import tempfile

        self.timeout = timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.count = 0
        self.env = dict(os.environ)
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH")) if p)

    def run(self, spec: dict) -> dict:
        import subprocess

        self.count += 1
        spec_file = self.tmp / f"spec{self.count}.json"
        result_file = self.tmp / f"result{self.count}.json"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [sys.executable, "-m", "benchmarks.worker", "--spec", f"@{spec_file}", "--result", str(result_file)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=self.env)
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": f"worker timed out after {self.timeout:.0f} s"}
        if result_file.is_file():
            return json.loads(result_file.read_text(encoding="utf-8"))
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {"status": "error", "reason": f"worker exited {proc.returncode} without a result: " + " | ".join(tail)}

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
