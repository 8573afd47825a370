"""Cross-compare: the float Keras stages against every TFLite variant of a bundle, on a held-out split.

Every number comes from predictions made here: the split's images go through the shared preprocessing
(edge_runtime.preprocess), the Keras models run in float, each TFLite model runs in an interpreter fed the
way the edge feeds it (its own input quantization; outputs dequantized with their own scale/zero_point).

Per model (keras-float32 and each variant):
  Stage 1 (all images, clean vs defective at the run's threshold): accuracy, macro P/R/F1, per-class F1,
    agreement with float (same side of the threshold), mean |P(defective) - float|.
  Stage 2 (defect images whose class Stage 2 knows): accuracy, macro P/R/F1, per-class F1, agreement with
    float (same argmax), mean |probability - float|.
  End to end (8 classes: clean below the threshold, else Stage 2's top-1; Stage 2 runs only on flagged
    images): accuracy, macro P/R/F1, per-class F1, agreement with float, defect escapes (defective called
    clean), false alarms, review count (Stage-2 confidence under the review floor).
  Size: bytes of both stage files, and the ratio to the Keras files and to the float32 TFLite files.
Writes compare.json, compare.md and confusion_<model>.png; prints the table.

`only` (--only DIR) keeps the split's images under DIR, e.g. a fab's reviewed images exported by
`edge-inspect export-labels` and ingested by prepare. When DIR is such an export, its manifest holds the label
each image got on the board from the deployed bundle (model_label): the report then also scores those recorded
labels against the reviewed ones on the same images, beside every model here ("recorded"), so a new bundle
is seen to beat (or not) the deployed one on the fab's own images before it is deployed.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from convert.export import BY_FIDELITY
from edge_runtime.bundle import MANIFEST, Bundle, BundleError, StageSpec, load_bundle
from edge_runtime.gate import is_defective, stage1_score
from edge_runtime.inspector import Stage, StageRunner
from edge_runtime.preprocess import ImageError, decode_for, to_model_input
from edge_runtime.evaluation import classification_metrics, escape_rate, two_stage_labels

log = logging.getLogger("convert.compare")

KERAS = "keras-float32"
STAGE1_CLASSES = ["clean", "defective"]
VARIANT_ORDER = BY_FIDELITY       # from float32 down to the deployed int8 (convert/export.py)


class CompareError(ValueError):
    """The bundle or the split cannot be compared: the message says which file and why."""


# ---- inputs ----------------------------------------------------------------------------------------------

def read_bundle(bundle_dir: str | os.PathLike, run) -> tuple[Bundle, dict[str, dict[int, bytes]]]:
    """The bundle as edge_runtime reads it, with every variant's model bytes (each file's sha256 checked once);
    checks the bundle belongs to this run's stages."""
    try:
        bundle = load_bundle(bundle_dir, verify_all=False)
        models = {variant: {n: bundle.model_bytes(n, variant) for n in (1, 2)} for variant in bundle.variants}
    except BundleError as exc:
        raise CompareError(str(exc)) from exc
    where = bundle.root / MANIFEST
    if list(bundle.stage2_classes) != run.stage2_classes:
        raise CompareError(f"{where}: Stage-2 classes {list(bundle.stage2_classes)} differ from the "
                           f"run's {run.stage2_classes}: bundle and run do not belong together")
    for n in (1, 2):
        size = run.image_size_of(n)
        if bundle.image_sizes[n] != (size, size):
            raise CompareError(f"{where}: Stage-{n} input size {bundle.image_sizes[n][0]}x{bundle.image_sizes[n][1]} "
                               f"differs from the run's {size}x{size}")
    if bundle.heads.get(1) is not None and list(bundle.stage_classes[1]) != run.stage1_classes:
        raise CompareError(f"{where}: Stage-1 classes {list(bundle.stage_classes[1])} differ from the run's "
                           f"{run.stage1_classes}")
    return bundle, models


def load_split_images(run, split: str, only: Path | None = None
                      ) -> tuple[dict[int, np.ndarray], list[str], list[str], list[tuple[str, str]]]:
    """Per stage, uint8 N x H x W x 3 at that stage's input size through the shared preprocessing (each file
    decoded once), with labels and paths; unreadable files skipped. only: keep the images under this folder."""
    rows = run.rows(split)
    if only is not None:
        rows = [(p, lab) for p, lab in rows if only in run.resolve(p).resolve().parents]
        if not rows:
            raise CompareError(f"{run.split_csv}: no image of the {split} split lies under --only {only}")
    if not rows:
        raise CompareError(f"{run.split_csv}: the {split} split has no images")
    sizes = {n: run.image_size_of(n) for n in (1, 2)}
    images: dict[int, list] = {1: [], 2: []}
    labels, paths, skipped = [], [], []
    for path, label in rows:
        try:
            gray = decode_for(run.resolve(path), max(sizes.values()))
        except ImageError as exc:
            skipped.append((path, str(exc)))
            continue
        for n in (1, 2):
            images[n].append(to_model_input(gray, sizes[n]))
        labels.append(label)
        paths.append(path)
    for path, reason in skipped:
        log.warning("compare: skipped %s: %s", path, reason)
    if not labels:
        raise CompareError(f"no readable image in the {split} split ({len(skipped)} unreadable)")
    return {n: np.stack(images[n]) for n in (1, 2)}, labels, paths, skipped


# ---- predictions -----------------------------------------------------------------------------------------

def keras_predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch, verbose=0), dtype=np.float64)


class TFLiteModel:
    """One TFLite stage, fed exactly as the edge feeds it: edge_runtime's StageRunner (its own input
    quantization; outputs dequantized with their own scale/zero_point) and, in a format-/2 bundle, the stage's
    numpy head (edge_runtime.inspector.Stage). predict() gives the stage's probabilities."""

    def __init__(self, spec: StageSpec, data: bytes, threads: int = 1, head=None, classes=("defective",)):
        self.stage = Stage(StageRunner(spec, data, threads, None), head, tuple(classes))

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = [np.array(self.stage.probs(image), dtype=np.float64) for image in images]   # copies: buffers reused
        return np.asarray(out, dtype=np.float64).reshape(len(images), -1)


# ---- metrics ---------------------------------------------------------------------------------------------

def _index(labels, classes) -> np.ndarray:
    pos = {c: i for i, c in enumerate(classes)}
    return np.array([pos[x] for x in labels], dtype=int)


def evaluate(p1: np.ndarray, p2: np.ndarray, labels: list[str], run, ref: dict | None = None,
             threshold: float | None = None) -> dict:
    """Metrics of one model pair. p1: N P(defective); p2: N x C Stage-2 probabilities (rows used: defect
    images for the per-stage metrics, flagged images end to end). ref: the float model's p1/p2 for agreement.
    threshold: the Stage-1 threshold these scores are gated at (default the run's; a bundle whose heads were
    refitted on its int8 features carries its own)."""
    thr = run.stage1_threshold if threshold is None else threshold
    clean, classes = run.clean_label, run.stage2_classes
    labels_arr = np.asarray(labels, dtype=object)
    defective_true = labels_arr != clean
    flagged = is_defective(p1, thr)

    s1 = classification_metrics(defective_true.astype(int), flagged.astype(int), STAGE1_CLASSES)
    in_s2 = np.isin(labels_arr, classes)                 # defect images of a class Stage 2 knows
    s2 = classification_metrics(_index(labels_arr[in_s2], classes), p2[in_s2].argmax(axis=1), classes) \
        if in_s2.any() else None
    final, review = two_stage_labels(p1, np.where(flagged[:, None], p2, 0.0), thr, classes, clean,
                                     review_floor=run.stage2_review_floor)
    e2e = classification_metrics(_index(labels_arr, run.taxonomy), _index(final, run.taxonomy), run.taxonomy)
    esc = escape_rate(labels_arr, final, clean)
    out = {"stage1": s1, "stage2": s2, "end_to_end": {**e2e, **esc, "review": int(review.sum())},
           "stage2_excluded": int((defective_true & ~in_s2).sum()), "final_labels": list(map(str, final))}
    if ref is not None:
        s1["agreement"] = float(np.mean(flagged == is_defective(ref["p1"], run.stage1_threshold)))
        s1["mean_abs_error"] = float(np.mean(np.abs(p1 - ref["p1"])))
        s1["max_abs_error"] = float(np.max(np.abs(p1 - ref["p1"])))
        if s2 is not None:
            s2["agreement"] = float(np.mean(p2[in_s2].argmax(axis=1) == ref["p2"][in_s2].argmax(axis=1)))
            s2["mean_abs_error"] = float(np.mean(np.abs(p2[in_s2] - ref["p2"][in_s2])))
            s2["max_abs_error"] = float(np.max(np.abs(p2[in_s2] - ref["p2"][in_s2])))
        out["end_to_end"]["agreement"] = float(np.mean(final == np.asarray(ref["final"], dtype=object)))
    return out


# ---- the command -----------------------------------------------------------------------------------------

def recorded_comparison(run, paths: list[str], labels: list[str], only: Path, results: dict) -> dict | None:
    """The deployed bundles' labels as recorded on the board (an export manifest's model_label) against the
    reviewed labels, and every model here on exactly the same images; None when `only` is not an export."""
    from edge_runtime.review.export_labels import read_manifest

    rows = read_manifest(only)
    hits = [k for k, p in enumerate(paths) if str(run.resolve(p).resolve()) in rows
            and rows[str(run.resolve(p).resolve())]["model_label"] in run.taxonomy]
    if not hits:
        return None
    truth = [labels[k] for k in hits]

    def score(pred: list[str]) -> dict:
        m = classification_metrics(_index(truth, run.taxonomy), _index(pred, run.taxonomy), run.taxonomy)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], **escape_rate(truth, pred, run.clean_label)}

    recorded = [rows[str(run.resolve(paths[k]).resolve())] for k in hits]
    bundles: dict[str, int] = {}
    for r in recorded:
        bundles[r["bundle_id"] or "unknown"] = bundles.get(r["bundle_id"] or "unknown", 0) + 1
    return {"images": len(hits), "of": len(paths), "bundles": bundles,
            "recorded": score([r["model_label"] for r in recorded]),
            "models": {name: score([r["final_labels"][k] for k in hits]) for name, r in results.items()}}


def compare_bundle(run, bundle_dir, *, split: str = "test", out_dir=None, threads: int = 1,
                   echo=print, only=None) -> dict:
    """run: a train.runs.Run with models loaded. Returns the compare.json content."""
    bundle, variants = read_bundle(bundle_dir, run)
    root = bundle.root
    out = Path(out_dir).resolve() if out_dir else root
    only = Path(only).resolve() if only is not None else None
    images, labels, paths, skipped = load_split_images(run, split, only)
    n_images = len(labels)
    labels_arr = np.asarray(labels, dtype=object)
    need_s2_base = labels_arr != run.clean_label
    log.info("compare: %d %s images (%d skipped), variants %s", n_images, split, len(skipped), list(variants))

    keras_bytes = sum((run.path / f"stage{s}.keras").stat().st_size for s in (1, 2))
    f32_bytes = sum(len(b) for b in variants["float32"].values()) if "float32" in variants else None
    ref = {"p1": stage1_score(keras_predict(run.models[1], images[1]), run.stage1_classes, run.clean_label),
           "p2": keras_predict(run.models[2], images[2])}
    results = {KERAS: evaluate(ref["p1"], ref["p2"], labels, run)}
    scores = {KERAS: ref["p1"]}
    ref["final"] = results[KERAS]["final_labels"]
    results[KERAS]["bytes"] = keras_bytes

    order = [v for v in VARIANT_ORDER if v in variants] + [v for v in variants if v not in VARIANT_ORDER]
    for variant in order:
        stage1 = TFLiteModel(bundle.stage(1, variant), variants[variant][1], threads, bundle.heads.get(1),
                             bundle.stage_classes[1])
        p1 = stage1_score(stage1.predict(images[1]), bundle.stage_classes[1], run.clean_label)
        need = need_s2_base | is_defective(p1, bundle.stage1_threshold)   # Stage 2: defect images + flagged ones
        p2 = np.zeros_like(ref["p2"])
        if need.any():
            p2[need] = TFLiteModel(bundle.stage(2, variant), variants[variant][2], threads, bundle.heads.get(2),
                                   bundle.stage2_classes).predict(images[2][need])
        results[variant] = evaluate(p1, p2, labels, run, ref, threshold=bundle.stage1_threshold)
        scores[variant] = p1
        results[variant]["bytes"] = sum(len(b) for b in variants[variant].values())
        log.info("compare: %s done", variant)
    for r in results.values():
        r["size_ratio_keras"] = r["bytes"] / keras_bytes
        r["size_ratio_float32_tflite"] = r["bytes"] / f32_bytes if f32_bytes else None

    report = {
        "run": str(run.path), "bundle": str(root), "split": split, "images": n_images,
        "only": str(only) if only is not None else None,
        "reviewed": recorded_comparison(run, paths, labels, only, results) if only is not None else None,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "stage1_threshold": run.stage1_threshold, "stage2_review_floor": run.stage2_review_floor,
        "bundle_stage1_threshold": bundle.stage1_threshold,
        "stage2_classes": run.stage2_classes, "taxonomy": run.taxonomy,
        "label_counts": {c: int(np.sum(labels_arr == c)) for c in run.taxonomy},
        "models": {name: {k: v for k, v in r.items() if k != "final_labels"} for name, r in results.items()},
        # Per image, for audits and for checking the edge runtime against these numbers.
        "predictions": {"paths": paths, "labels": labels,
                        "final": {name: r["final_labels"] for name, r in results.items()},
                        "stage1_score": {name: [round(float(x), 6) for x in sc] for name, sc in scores.items()}},
    }
    if "int8" in report["models"]:
        report["targets"] = int8_targets(report["models"])
    table = markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "compare.json", json.dumps(report, indent=2))
    _write_text(out / "compare.md", table)
    for name in results:
        plot_confusions(report["models"][name], f"{name}: run {run.name}, {split} split ({n_images} images)",
                        out / f"confusion_{name}.png")
    echo(table)
    log.info("compare written to %s (compare.json, compare.md, confusion_*.png)", out)
    return report


# The acceptance targets for the deployed int8 bundle, checked on every compare.
TARGETS = {"e2e_macro_f1_drop_pp": 1.0, "stage2_agreement": 0.98, "size_factor": 3.5}


def int8_targets(models: dict) -> dict:
    """int8 vs float: end-to-end macro-F1 within 1 pp, Stage-2 agreement >= 98%, escape rate no worse,
    about 4x smaller (>= 3.5x smaller than float32 TFLite, or than the Keras files without one)."""
    f, q = models[KERAS], models["int8"]
    drop_pp = 100 * (f["end_to_end"]["macro_f1"] - q["end_to_end"]["macro_f1"])
    agree = (q["stage2"] or {}).get("agreement")
    ratio = q["size_ratio_float32_tflite"] or q["size_ratio_keras"]
    checks = {
        "e2e_macro_f1_drop_pp": {"value": drop_pp, "target": f"<= {TARGETS['e2e_macro_f1_drop_pp']}",
                                 "ok": drop_pp <= TARGETS["e2e_macro_f1_drop_pp"]},
        "stage2_agreement": {"value": agree, "target": f">= {TARGETS['stage2_agreement']}",
                             "ok": agree is not None and agree >= TARGETS["stage2_agreement"]},
        "escape_rate": {"value": q["end_to_end"]["escape_rate"],
                        "target": f"<= float {f['end_to_end']['escape_rate']:.4f}",
                        "ok": q["end_to_end"]["escape_rate"] <= f["end_to_end"]["escape_rate"]},
        "size_factor": {"value": 1 / ratio, "target": f">= {TARGETS['size_factor']}x smaller",
                        "ok": 1 / ratio >= TARGETS["size_factor"]},
    }
    return {"all_ok": all(c["ok"] for c in checks.values()), "checks": checks}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _err(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown(report: dict) -> str:
    models = report["models"]
    head = ["model", "size MB", "x keras", "x tflite-f32", "S1 acc", "S1 F1", "S1 agree", "S1 err",
            "escapes", "escape %", "S2 acc", "S2 F1", "S2 agree", "S2 err", "E2E acc", "E2E F1", "E2E agree",
            "review"]
    where = f" under {report['only']}" if report.get("only") else ""
    lines = [f"Cross-compare on the {report['split']} split{where}: {report['images']} images "
             f"(Stage-1 threshold {report['stage1_threshold']:.4f}, review floor "
             f"{report['stage2_review_floor']:.2f}). Percentages; err = mean |score - float|.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, m in models.items():
        s1, s2, e = m["stage1"], m["stage2"] or {}, m["end_to_end"]
        ratio_f32 = m["size_ratio_float32_tflite"]
        cells = [name, f"{m['bytes'] / 1e6:.2f}", f"{m['size_ratio_keras']:.2f}",
                 "-" if ratio_f32 is None else f"{ratio_f32:.2f}",
                 _pct(s1["accuracy"]), _pct(s1["macro_f1"]), _pct(s1.get("agreement")), _err(s1.get("mean_abs_error")),
                 f"{e['escapes']}/{e['defective']}", _pct(e["escape_rate"]),
                 _pct(s2.get("accuracy")), _pct(s2.get("macro_f1")), _pct(s2.get("agreement")),
                 _err(s2.get("mean_abs_error")),
                 _pct(e["accuracy"]), _pct(e["macro_f1"]), _pct(e.get("agreement")), str(e["review"])]
        lines.append("| " + " | ".join(cells) + " |")
    if "targets" in report:
        t = report["targets"]["checks"]
        verdict = lambda c: "ok" if c["ok"] else "MISSED"   # noqa: E731
        lines += ["", "int8 targets: "
                  f"E2E macro-F1 drop {t['e2e_macro_f1_drop_pp']['value']:.2f} pp (<= 1): "
                  f"{verdict(t['e2e_macro_f1_drop_pp'])}; "
                  f"Stage-2 agreement {_pct(t['stage2_agreement']['value'])}% (>= 98): "
                  f"{verdict(t['stage2_agreement'])}; "
                  f"escape rate {_pct(t['escape_rate']['value'])}% (<= float): {verdict(t['escape_rate'])}; "
                  f"{t['size_factor']['value']:.1f}x smaller (>= 3.5x): {verdict(t['size_factor'])}."]
    if report.get("reviewed"):
        rv = report["reviewed"]
        deployed = ", ".join(f"{b[:12]} ({n})" for b, n in rv["bundles"].items())
        lines += ["", f"On the fab's reviewed images ({rv['images']} of {report['images']} have the label the board "
                      f"recorded): the deployed bundle(s) {deployed} as recorded, against the models here. "
                      "Percentages.", "", "| model | E2E acc | E2E macro-F1 | escapes |", "|---|---|---|---|"]
        for name, s in [("recorded on the board", rv["recorded"]), *rv["models"].items()]:
            lines.append(f"| {name} | {_pct(s['accuracy'])} | {_pct(s['macro_f1'])} | "
                         f"{s['escapes']}/{s['defective']} |")
    classes = [c for c in report["taxonomy"] if report["label_counts"].get(c)]
    lines += ["", "End-to-end per-class F1 (%), classes present in the split:", "",
              "| model | " + " | ".join(f"{c} (n={report['label_counts'][c]})" for c in classes) + " |",
              "|" + "|".join("---" for _ in range(len(classes) + 1)) + "|"]
    for name, m in models.items():
        pc = m["end_to_end"]["per_class"]
        lines.append(f"| {name} | " + " | ".join(_pct(pc[c]["f1"]) for c in classes) + " |")
    return "\n".join(lines) + "\n"


def plot_confusions(metrics: dict, title: str, path: Path) -> None:
    """Stage 1, Stage 2 and end-to-end confusion matrices side by side (rows true, columns predicted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Stage 1", metrics["stage1"])]
    if metrics["stage2"] is not None:
        panels.append(("Stage 2 (defects)", metrics["stage2"]))
    panels.append(("End to end", metrics["end_to_end"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0))
    for ax, (panel, m) in zip(np.atleast_1d(axes), panels):
        cm = np.asarray(m["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        ticks = range(len(m["classes"]))
        ax.set_xticks(ticks, m["classes"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, m["classes"], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{panel}: acc {100 * m['accuracy']:.1f}%, macro-F1 {100 * m['macro_f1']:.1f}%", fontsize=9)
        top = cm.max() if cm.size else 0
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > top / 2 else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
