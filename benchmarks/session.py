"""One `python -m benchmarks` run's setup and shared state: the bundle (checked), the variants, the output folder,
the machine, the runtimes that can run here, the labelled images and prevalence streams, the results.json
skeleton, the progress count and the checkpoint (results.json after every measurement). The runners
(benchmarks/runners.py) read it; nothing here starts a worker."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.machine import describe_machine
from benchmarks.schema import FORMAT, BundleInfo, Images, Results, Runtime, Settings
from benchmarks.streams import (discover_images, images_from_split_csv, label_mapper, prevalence_stream,
                                split_pools)

TFLITE_RUNTIMES = ("litert", "tflite-runtime")
RUNTIMES = TFLITE_RUNTIMES + ("keras",)
RUNTIME_MODULES = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
RUNTIME_DISTS = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SetupError(Exception):
    """The run cannot start (bad bundle, variants, --out or --images): exit 2 with the message."""


def runtime_availability(requested: list[str], keras_run: Path | None, keras_reason: str) -> dict[str, Runtime]:
    """Which requested runtimes can run here, with versions or the reason they cannot (nothing imported)."""
    from importlib import metadata

    out = {}
    for name in requested:
        if name in TFLITE_RUNTIMES:
            if importlib.util.find_spec(RUNTIME_MODULES[name]) is None:
                out[name] = {"status": "not installed",
                             "reason": f"python module {RUNTIME_MODULES[name]} not found "
                                       f"(pip install {RUNTIME_DISTS[name]})"}
                continue
            try:
                version = metadata.version(RUNTIME_DISTS[name])
            except metadata.PackageNotFoundError:
                version = "?"
            out[name] = {"status": "ok", "version": version}
        else:
            missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
            if missing:
                out[name] = {"status": "not installed", "reason": f"{', '.join(missing)} not installed"}
            elif keras_run is None:
                out[name] = {"status": "skipped", "reason": keras_reason}
            else:
                try:
                    version = metadata.version("keras")
                except metadata.PackageNotFoundError:
                    version = "?"
                out[name] = {"status": "ok", "version": version, "run": str(keras_run)}
    return out


def find_keras_run(arg: str | None, source_run: str | None) -> tuple[Path | None, str]:
    """The training run whose stageN.keras files are the notebook-path baseline, or (None, why not)."""
    candidate = arg or source_run
    where = "--keras-run" if arg else "the manifest's source_run"
    if not candidate:
        return None, "no --keras-run given and the manifest has no source_run"
    run = Path(candidate)
    missing = [f for f in ("stage1.keras", "stage2.keras") if not (run / f).is_file()]
    if missing:
        return None, f"{where} {candidate}: {', '.join(missing)} not found"
    return run.resolve(), ""


def collect_images(args, source_run: str | None, clean_label: str) -> dict:
    """Labelled images for the end-to-end streams, from --images or the source run's split.csv: the Images
    entry of results.json, plus "pools" (clean, defective) for the streams."""
    if args.images:
        mapper, how = label_mapper()
        items, unmapped = discover_images(args.images, mapper)
        source = f"{args.images} (labels: {how})"
    else:
        split_csv = Path(source_run) / "split.csv" if source_run else None
        if not split_csv or not split_csv.is_file():
            return {"status": "skipped", "reason": "no --images given and the bundle's source run has no split.csv"}
        items, unmapped = images_from_split_csv(split_csv), {}
        source = f"{split_csv} (test split)"
    clean, defective = split_pools(items, clean_label)
    info = {"status": "ok", "source": source, "clean": len(clean), "defective": len(defective),
            "unmapped_folders": unmapped, "pools": (clean, defective)}
    if not items:
        info.update(status="skipped", reason=f"no labelled images found in {source}")
    return info


class Session:
    """The run's setup from the arguments (SetupError when it cannot start), then what every runner shares."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None):
        from edge_runtime.bundle import BundleError, load_bundle

        self.args, self.argv = args, argv
        try:
            self.bundle = load_bundle(args.models)   # refuses a damaged bundle (sha256) before anything is timed
        except BundleError as exc:
            raise SetupError(str(exc)) from None
        self.variants = args.variants or list(self.bundle.variants)
        missing = [v for v in self.variants if v not in self.bundle.variants]
        if missing:
            raise SetupError(f"--variants {missing} not in the bundle (has {list(self.bundle.variants)})")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or f"reports/bench-{stamp}")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SetupError(f"cannot create --out {self.out}: {exc.strerror or exc}") from None
        self.machine = describe_machine()
        self.keras_run, keras_reason = find_keras_run(args.keras_run, self.bundle.source_run)
        self.runtimes = runtime_availability(args.runtime, self.keras_run, keras_reason)
        log(f"machine: {self.machine['cpu_model']}, {self.machine['cores']} cores, {self.machine['architecture']}, "
            f"load {self.machine['load_average_at_start']}")
        for name, info in self.runtimes.items():
            log(f"runtime {name}: {info['status']}" + (f" {info['version']}" if info.get("version") else "")
                + (f" ({info['reason']})" if info.get("reason") else ""))
        self.tflite_rts = [r for r in args.runtime if r in TFLITE_RUNTIMES and self.runtimes[r]["status"] == "ok"]
        self.use_keras = "keras" in self.runtimes and self.runtimes["keras"]["status"] == "ok"
        self.images, self.streams, self.labelled = self._streams()
        self.total = 0          # worker runs planned, for the progress count (set once the runners are built)
        self.steps = 0          # worker runs started so far

    def _streams(self) -> tuple[Images, dict[str, list], list[list]]:
        """The Images entry, the prevalence streams, and every labelled image (for the gate's measured recall
        and fpr; --gate-images spreads a subset evenly over them)."""
        args = self.args
        try:
            images = collect_images(args, self.bundle.source_run, self.bundle.clean_label)
        except (FileNotFoundError, OSError, KeyError) as exc:   # a wrong --images folder or a malformed split.csv
            raise SetupError(str(exc)) from None
        streams = {}
        pools = images.pop("pools", None)
        labelled = []
        if images["status"] == "ok":
            clean, defective = pools
            labelled = [list(it) for it in clean + defective]
            if args.gate_images and len(labelled) > args.gate_images:   # evenly spread: both pools stay in
                n = args.gate_images
                labelled = [labelled[i * len(labelled) // n] for i in range(n)]
            for p in args.prevalence:
                try:
                    streams[str(p)] = [list(it) for it in prevalence_stream(clean, defective, p, args.stream_length,
                                                                            seed=args.seed)]
                except ValueError as exc:
                    images.setdefault("skipped_prevalences", {})[str(p)] = str(exc)
            log(f"images: {images['clean']} clean, {images['defective']} defective from {images['source']}"
                + (f"; unmapped folders ignored: {images['unmapped_folders']}" if images["unmapped_folders"] else ""))
        else:
            log(f"end-to-end: skipped ({images['reason']})")
        return images, streams, labelled

    def skeleton(self) -> Results:
        """results.json before any measurement: the settings, the bundle, the machine, runtimes and images."""
        args, bundle = self.args, self.bundle
        settings = Settings(bundle=str(bundle.root), variants=self.variants, threads=args.threads,
                            runtimes=args.runtime, prevalences=args.prevalence, runs=args.runs,
                            max_seconds=args.max_seconds, stream_length=args.stream_length, images=args.images,
                            keras_run=str(self.keras_run) if self.keras_run else None, seed=args.seed,
                            gate_images=args.gate_images,
                            command=" ".join(["python -m benchmarks"] + (self.argv or sys.argv[1:])))
        info = BundleInfo(path=str(bundle.root), image_size=list(bundle.image_size), backbones=bundle.backbones,
                          variants=list(bundle.variants), stage1_threshold=bundle.stage1_threshold,
                          stage2_classes=list(bundle.stage2_classes), source_run=bundle.source_run,
                          format=bundle.format, image_sizes={str(n): list(hw) for n, hw in bundle.image_sizes.items()},
                          stage_classes={str(n): list(c) for n, c in bundle.stage_classes.items()})
        return Results(format=FORMAT, machine=self.machine, settings=settings, bundle=info, runtimes=self.runtimes,
                       images=self.images, stages=[], pipeline=[], notes=[])

    def progress(self, what: str) -> None:
        self.steps += 1
        log(f"[{self.steps}/{self.total}] {what}")

    def checkpoint(self, results: Results, **part) -> None:
        """results.json with a runner's part so far, after every measurement: an interrupted run keeps what it
        measured."""
        report.write_json(self.out / "results.json", {**results, **part})
