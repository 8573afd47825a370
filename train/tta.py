"""python -m train tta --run runs/NAME [--split test]

Does test-time flip averaging pay for its latency? Runs a finished run's float stages on the split four
times (as is, flipped left-right, up-down, both), averages the probabilities, recalibrates the Stage-1
threshold on val the same way training does, and prints the end-to-end figures with and without flips.
The runtime does not flip: 4 invocations per stage would quadruple the board's cost, so it must earn that
here first (README figures).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from edge_runtime.evaluation import classification_metrics, escape_rate, roc_auc, threshold_for_recall, two_stage_labels

FLIPS = {"none": lambda x: x, "lr": lambda x: x[:, :, ::-1], "ud": lambda x: x[:, ::-1], "both": lambda x: x[:, ::-1, ::-1]}


def predict(model, x: np.ndarray, flips: list[str]) -> np.ndarray:
    return np.mean([model.predict(FLIPS[f](x).astype(np.float32), batch_size=32, verbose=0) for f in flips], axis=0)


def evaluate(run, split: str, flips: list[str]) -> dict:
    from train.data import load_arrays

    taxonomy, clean = run.taxonomy, run.clean_label
    sets = {s: load_arrays([(str(run.resolve(p)), lab) for p, lab in run.rows(s)], run.image_size)
            for s in ("val", split)}
    s1 = {s: predict(run.models[1], sets[s].x, flips).reshape(-1) for s in sets}
    val_defective = s1["val"][np.array([lab != clean for lab in sets["val"].labels])]
    threshold = threshold_for_recall(val_defective, float(run.info.get("target_defect_recall", 0.98)))
    probs2 = predict(run.models[2], sets[split].x, flips)
    final, _review = two_stage_labels(s1[split], probs2, threshold, run.stage2_classes, clean)
    truth = sets[split].labels
    index = {c: i for i, c in enumerate(taxonomy)}
    m = classification_metrics([index[t] for t in truth], [index[f] for f in final], taxonomy)
    esc = escape_rate(truth, final, clean)
    return {"flips": flips, "threshold": threshold, "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
            "defect_recall": 1 - esc["escape_rate"], "clean_specificity": 1 - esc["false_alarms"] / max(1, esc["clean"]),
            "stage1_roc_auc": roc_auc(s1[split], np.array([t != clean for t in truth])),
            "invocations_per_stage": len(flips)}


def main(argv: list[str] | None = None) -> int:
    from train.runs import RunError, load_models, read_run

    p = argparse.ArgumentParser(prog="python -m train tta", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("--split", default="test", choices=["val", "test"])
    args = p.parse_args(argv)
    try:
        run = read_run(args.run)
        load_models(run)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [evaluate(run, args.split, ["none"]), evaluate(run, args.split, list(FLIPS))]
    (run.path / "tta.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"| {run.name} {args.split} | stage invocations | macro-F1 | accuracy | defect recall | clean specificity "
          "| Stage-1 ROC-AUC |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| flips {'+'.join(r['flips'])} | {r['invocations_per_stage']} | {r['macro_f1']:.3f} | "
              f"{r['accuracy']:.3f} | {r['defect_recall']:.3f} | {r['clean_specificity']:.3f} | "
              f"{r['stage1_roc_auc']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
