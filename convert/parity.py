"""python -m convert check BUNDLE --images PATH... [--runtime litert,tflite-runtime] [...]

Does a bundle give the same answers on every runtime it may meet? Runs each runtime on the same images, each
in its own process (convert/parity_worker.py, edge_runtime only) and, with --python, in its own Python (a
tflite-runtime venv, or an aarch64 Python under qemu: deploy/arm64-smoke.sh --exec), then compares every
runtime with the first one listed (the first that ran, if it did not):
  labels      the final two-stage label (edge_runtime.gate: Stage 1's P(defective) against the threshold,
              Stage-2 top-1), in agreement; from the stages' probabilities (format /2: after the numpy heads)
  S1 / S2     the largest difference of the models' outputs, in output quantization steps (int8) or absolute
              (float); format /2: of the backbones' features, where int8 steps exist
  P(def)      the largest difference of Stage 1's P(defective) (absolute)
  ms          mean Stage-1 and Stage-2 latency, model and head (only meaningful on real hardware, not under qemu)
Stage 2 runs on every image, so it is compared everywhere, not only where Stage 1 flags a defect. Each stage
runs at its own input size (the image decoded once, as edge-inspect does).

A runtime spec is [LABEL=]NAME[:KERNELS]: NAME litert, tflite-runtime or tensorflow; KERNELS default (what the
runtime does on its own: LiteRT applies XNNPACK), builtin (TFLite's own kernels) or reference. A runtime the
bundle's manifest says is too old refuses it (as edge-inspect does): that is safe and reported, not a failure.

Parity holds when every runtime that ran scored every image the first one scored, labels agree on all of them
and Stage-1 outputs (format /2: features) lie within --tolerance output steps (default 1) of the first
runtime's.
Exit status: 0 parity holds; 1 it does not (or a runtime crashed); 2 bad input (bundle, images, arguments) or
fewer than two runtimes ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class CheckError(ValueError):
    """Bad input for the check: the message says what (exit 2)."""


def parse_runtime(spec: str) -> tuple[str, str, str]:
    """'[LABEL=]NAME[:KERNELS]' -> (label, name, kernels)."""
    from edge_runtime.interpreter import BACKENDS, KERNELS

    label, _, rest = spec.rpartition("=")
    name, _, kernels = rest.partition(":")
    kernels = kernels or "default"
    if name not in BACKENDS:
        raise CheckError(f"--runtime {spec!r}: unknown runtime {name!r} (choose from {', '.join(BACKENDS)})")
    if kernels not in KERNELS:
        raise CheckError(f"--runtime {spec!r}: unknown kernels {kernels!r} (choose from {', '.join(KERNELS)})")
    return label or rest, name, kernels


def pick_images(paths: list[str], limit: int | None) -> list[Path]:
    from edge_runtime.inputs import collect_inputs

    files, problems = collect_inputs(paths)
    if problems:
        where, why = problems[0]
        raise CheckError(f"--images {where}: {why}")
    if limit and len(files) > limit:       # evenly spread over the sorted list (class folders stay mixed)
        files = [files[i * len(files) // limit] for i in range(limit)]
    return files


def run_worker(name: str, kernels: str, command: list[str], bundle: Path, variant: str,
               threads: int, list_file: Path, timeout: float) -> dict:
    argv = command + ["-m", "convert.parity_worker", "--bundle", str(bundle), "--variant", variant,
                      "--runtime", name, "--kernels", kernels, "--threads", str(threads), str(list_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               TF_CPP_MIN_LOG_LEVEL="3")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except FileNotFoundError:
        return {"status": "error", "reason": f"cannot start {command[0]!r}"}
    except subprocess.TimeoutExpired:
        return {"status": "crashed", "reason": f"no answer within {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    what = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    if proc.returncode >= 128:
        what = f"signal {proc.returncode - 128}"
    return {"status": "crashed", "reason": f"{what}: {tail}"}


def probs(row: dict, n: int) -> list[float]:
    """Stage n's probabilities in a worker's row: after the head (format /2), or the model's own output."""
    return row.get(f"probs{n}", row[f"stage{n}"])


def score_and_label(row: dict, bundle) -> tuple[float, str]:
    """Stage 1's P(defective) and the final label of one image, by the runtime's rules (edge_runtime.gate)."""
    from edge_runtime.gate import is_defective, stage1_score

    score = float(stage1_score(probs(row, 1), bundle.stage_classes[1], bundle.clean_label))
    if not is_defective(score, bundle.stage1_threshold):
        return score, bundle.clean_label
    p2 = probs(row, 2)
    return score, bundle.stage2_classes[max(range(len(p2)), key=p2.__getitem__)]


def compare(ref: dict, other: dict, bundle) -> dict:
    """Agreement of `other` with `ref` over the images both scored."""
    steps = {n: bundle.stage(n).output.scale for n in (1, 2)}
    a = {r["path"]: r for r in ref["images"] if "error" not in r}
    b = {r["path"]: r for r in other["images"] if "error" not in r}
    common = [p for p in a if p in b]
    worst = {1: 0.0, 2: 0.0}
    worst_score = 0.0
    disagree = []
    for path in common:
        x, y = a[path], b[path]
        for n in (1, 2):
            diff = max(abs(u - v) for u, v in zip(x[f"stage{n}"], y[f"stage{n}"]))
            worst[n] = max(worst[n], diff / steps[n] if steps[n] else diff)
        (sa, la), (sb, lb) = score_and_label(x, bundle), score_and_label(y, bundle)
        worst_score = max(worst_score, abs(sa - sb))
        if la != lb:
            disagree.append({"path": path, "labels": [la, lb], "stage1": [sa, sb]})
    return {"images": len(common), "labels_agree": len(common) - len(disagree),
            "stage1_max_diff": round(worst[1], 4), "stage2_max_diff": round(worst[2], 4),
            "score_max_diff": round(worst_score, 6),
            "unit": "steps" if steps[1] else "absolute", "disagreements": disagree}


def mean_ms(result: dict, n: int) -> float | None:
    times = [r[f"stage{n}_ms"] for r in result.get("images", []) if f"stage{n}_ms" in r]
    return round(sum(times) / len(times), 3) if times else None


def report(bundle, rows: list[dict], tolerance: float) -> tuple[str, bool]:
    """Markdown table and whether parity holds."""
    what = "backbone features" if any(h is not None for h in bundle.heads.values()) else "scores"
    sizes = " / ".join(f"{h}x{w}" for h, w in (bundle.image_sizes[1], bundle.image_sizes[2]))
    lines = [f"Parity of {bundle.root} (variant {bundle.variant}, inputs {sizes}) against {rows[0]['label']}; "
             f"{what} in output quantization steps (Stage 1: {bundle.stage1.output.scale:g}, Stage 2: "
             f"{bundle.stage2.output.scale:g}), tolerance {tolerance:g} step(s) on Stage 1; labels and P(defective) "
             "from the stages' probabilities.", "",
             "| runtime | version | kernels | python | images | labels agree | S1 max diff | S2 max diff | "
             "P(def) max diff | S1 ms | S2 ms | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    holds = True
    for row in rows:
        res, cmp_ = row["result"], row.get("compare")
        if res.get("status") != "ok":
            verdict = {"refused": "refused (safe)", "not installed": "not installed"}.get(res.get("status"),
                                                                                          res.get("status"))
            holds &= res.get("status") in ("refused", "not installed")
            lines.append(f"| {row['label']} | | {row['kernels']} | | | | | | | | | {verdict}: {res.get('reason', '')} |")
            continue
        if cmp_ is None:
            verdict, agree, d1, d2, ds = "reference", "-", "-", "-", "-"
        else:
            scored = len([r for r in rows[0]["result"]["images"] if "error" not in r])
            ok = (cmp_["images"] == scored > 0 and cmp_["labels_agree"] == cmp_["images"]
                  and (cmp_["unit"] != "steps" or cmp_["stage1_max_diff"] <= tolerance))
            holds &= ok
            verdict = "parity" if ok else "DIFFERS"
            agree = f"{cmp_['labels_agree']}/{cmp_['images']}"
            d1, d2 = f"{cmp_['stage1_max_diff']:g}", f"{cmp_['stage2_max_diff']:g}"
            ds = f"{cmp_['score_max_diff']:g}"
        lines.append(f"| {row['label']} | {res['distribution']} {res['version']} | {res['kernels']} | "
                     f"{res['python']} {res['machine']} | {len([r for r in res['images'] if 'error' not in r])} | "
                     f"{agree} | {d1} | {d2} | {ds} | {mean_ms(res, 1)} | {mean_ms(res, 2)} | {verdict} |")
    return "\n".join(lines) + "\n", holds


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m convert check",
                                description="Run a bundle on several runtimes and compare their answers.",
                                epilog="exit status: 0 parity holds, 1 it does not, 2 bad input")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (python -m convert)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    p.add_argument("--runtime", default="litert,tflite-runtime", metavar="SPEC[,SPEC...]",
                   help="[LABEL=]NAME[:KERNELS], comma-separated; the first is the reference "
                        "(default litert,tflite-runtime)")
    p.add_argument("--python", action="append", default=[], metavar="LABEL=COMMAND",
                   help="the Python that runs LABEL's worker (default: this one), e.g. "
                        "tflite-runtime=/opt/venv-tflrt/bin/python")
    p.add_argument("--variant", help="bundle variant (default: the manifest's default)")
    p.add_argument("--limit", type=int, metavar="N", help="use N images spread over the sorted list")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--tolerance", type=float, default=1.0, help="Stage-1 score tolerance in steps (default 1)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per runtime (default 3600)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the full report here (every runtime's scores per image, the disagreements)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from edge_runtime.bundle import BundleError, load_bundle

    try:
        if args.limit is not None and args.limit < 1:
            raise CheckError("--limit must be at least 1")
        if args.threads < 1:
            raise CheckError("--threads must be at least 1")
        specs = [parse_runtime(s.strip()) for s in args.runtime.split(",") if s.strip()]
        labels = [s[0] for s in specs]
        if not specs or len(set(labels)) != len(labels):
            raise CheckError(f"--runtime {args.runtime!r}: give distinct runtimes (LABEL=NAME to run one twice)")
        commands = {}
        for item in args.python:
            label, sep, command = item.partition("=")
            if not sep or label not in labels or not command.strip():
                raise CheckError(f"--python {item!r}: expected LABEL=COMMAND with LABEL one of {labels}")
            commands[label] = shlex.split(command)
        bundle = load_bundle(args.bundle, args.variant)
        images = pick_images(args.images, args.limit)
    except (CheckError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="sem-inspect-check-") as tmp:
        list_file = Path(tmp) / "images.txt"
        list_file.write_text("".join(f"{p.resolve()}\n" for p in images), encoding="utf-8")
        for label, name, kernels in specs:
            print(f"check: {label} ({name}, {kernels} kernels) on {len(images)} images ...", file=sys.stderr)
            result = run_worker(name, kernels, commands.get(label, [sys.executable]), bundle.root,
                                bundle.variant, args.threads, list_file, args.timeout)
            rows.append({"label": label, "runtime": name, "kernels": kernels, "result": result})
    ran = [row for row in rows if row["result"].get("status") == "ok"]
    if len(ran) < 2:
        why = "; ".join(f"{r['label']}: {r['result'].get('status')} ({r['result'].get('reason', '')})"
                        for r in rows if r not in ran)
        print(f"error: fewer than two runtimes ran the bundle, nothing to compare ({why})", file=sys.stderr)
        return 2
    rows.remove(ran[0])
    rows.insert(0, ran[0])
    for row in ran:            # each image's P(defective) and final label, as that runtime's outputs give them
        for image in row["result"]["images"]:
            if "error" not in image:
                image["stage1_score"], image["label"] = score_and_label(image, bundle)
    for row in ran[1:]:
        row["compare"] = compare(ran[0]["result"], row["result"], bundle)
    text, holds = report(bundle, rows, args.tolerance)
    sys.stdout.write(text)
    if args.json:
        full = {"bundle": str(bundle.root), "variant": bundle.variant, "tolerance": args.tolerance,
                "parity": holds, "runtimes": [{k: v for k, v in r.items() if k != "result"}
                                              | {"status": r["result"].get("status"),
                                                 "version": r["result"].get("version"),
                                                 "python": r["result"].get("python"),
                                                 "machine": r["result"].get("machine"),
                                                 "reason": r["result"].get("reason"),
                                                 "stage1_ms": mean_ms(r["result"], 1),
                                                 "stage2_ms": mean_ms(r["result"], 2),
                                                 "images": r["result"].get("images")} for r in rows]}
        Path(args.json).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return 0 if holds else 1
