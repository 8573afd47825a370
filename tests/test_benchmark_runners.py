"""The mode table of `python -m benchmarks` (benchmarks.runners.MODES) and its runners agree: every part of
results.json has one runner, each runner run on the tiny bundle fills the part it declares, and the worker runs
each plans are the ones it makes."""
from __future__ import annotations

import typing

import numpy as np
from PIL import Image

from benchmarks.cli import parse_args
from benchmarks.runners import MODES, Runner
from benchmarks.schema import Results, problems
from benchmarks.session import Session
from benchmarks.worker import Workers

WRITTEN_BY_MAIN = {"elapsed_s"}      # the entry point's own key, after every mode has run


def labelled_images(root):
    """Two clean and two defective grayscale PNGs in class folders."""
    rng = np.random.default_rng(3)
    for folder in ("clean", "cracks"):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_every_part_of_the_results_has_one_mode():
    fills = [key for make in MODES.values() for key in make.fills]
    assert all(issubclass(make, Runner) and make.fills for make in MODES.values())
    assert len(fills) == len(set(fills)), "two modes fill the same key"
    assert set(fills) | Results.__required_keys__ | WRITTEN_BY_MAIN == set(typing.get_type_hints(Results))
    assert not set(fills) & WRITTEN_BY_MAIN


def test_each_mode_fills_its_part_on_the_tiny_bundle(tiny_bundle, tmp_path):
    images = labelled_images(tmp_path / "images")
    args = parse_args(["--models", str(tiny_bundle), "--images", str(images), "--threads", "1", "--runs", "3",
                       "--max-seconds", "1", "--stream-length", "4", "--prevalence", "0.5", "--runtime", "litert",
                       "--variants", "int8,float32", "--light-gate", str(tiny_bundle / "stage1.tflite"),
                       "--out", str(tmp_path / "out")])
    session = Session(args, [])
    results = session.skeleton()
    assert set(results) == Results.__required_keys__       # the session writes the skeleton, the modes the rest
    workers = Workers(args.timeout)
    runners = {name: make(session, workers) for name, make in MODES.items()}
    session.total = sum(runner.planned() for runner in runners.values())
    try:
        for name, runner in runners.items():
            steps_before, planned = session.steps, runner.planned()
            part = runner.run(results)
            assert set(part) == set(runner.fills), name
            assert all(part[key] for key in part), f"{name}: an empty part"
            assert session.steps - steps_before == planned, f"{name}: planned {planned} worker runs"
            statuses = [e.get("status") for value in part.values()
                        for e in (value if isinstance(value, list) else [value])]
            assert "error" not in statuses, (name, part)
            results.update(part)
    finally:
        workers.close()
    assert problems(results) == []
    assert session.steps == session.total
    assert [(r["stage"], r["variant"]) for r in results["stages"]] == [(1, "int8"), (1, "float32"), (2, "int8"),
                                                                      (2, "float32")]
    assert results["speedups"][0]["baseline"] == "litert float32"
    assert results["light_gate"]["rows"][0]["status"] == "ok"
    assert set(results["paired"][0]["latency"]) == {"stage1", "stage2", "light_gate"}
    assert results["pipeline"][0]["summary"][0]["images"] == 4
    assert results["gate_costs"][0]["images"] == 4
    assert results["cost_models"][0]["measured"]
    # the stage and pipeline modes checkpoint results.json as they go
    assert (tmp_path / "out" / "results.json").is_file()


def test_no_mode_plans_a_worker_run_when_nothing_can_run(tiny_bundle, tmp_path):
    """Only the Keras path asked for, without its models, and no images: nothing to measure."""
    args = parse_args(["--models", str(tiny_bundle), "--runtime", "keras", "--keras-run", str(tmp_path),
                       "--light-gate", "auto", "--out", str(tmp_path / "out")])
    session = Session(args, [])
    workers = Workers(args.timeout)
    try:
        assert {name: make(session, workers).planned() for name, make in MODES.items()} == dict.fromkeys(MODES, 0)
    finally:
        workers.close()
