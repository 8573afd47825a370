"""One adaptation, start to end: labelled images -> features -> refit -> a new bundle with its report.
Shared by `edge-inspect adapt` (images the operators reviewed, on the board) and `python -m train adapt`
(a class-folder export, centrally), so both produce the same bundle from the same images."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from edge_runtime.adapt.cache import FeatureCache
from edge_runtime.adapt.derive import derive_bundle
from edge_runtime.adapt.features import FeatureSet, extract, load_replay
from edge_runtime.adapt.fit import DEFAULT_LAMBDA
from edge_runtime.adapt.refit import FOLDS, AdaptError, refit
from edge_runtime.bundle import MANIFEST, load_bundle
from edge_runtime.inspector import Inspector
from edge_runtime.review.conflicts import describe

log = logging.getLogger("edge_inspect.adapt")
REPORT = "adapt_report.json"


def check_out(out: Path, source: Path) -> None:
    """The new bundle goes to a new or empty folder, or replaces an earlier bundle; never over the source."""
    if out.resolve() == source.resolve():
        raise AdaptError(f"--out {out} is the bundle being adapted: write the new bundle to another folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise AdaptError(f"--out {out} exists and is not a model bundle; refusing to replace it")


def adapt(bundle_path: str | os.PathLike, items: list[tuple], out: str | os.PathLike, *,
          fab_weight: float | None = None, lam: float = DEFAULT_LAMBDA, folds: int = FOLDS,
          target_recall: float = 0.98, threads: int | None = None, source: str = "", echo=print,
          board_key=None, cache_dir: str | os.PathLike | None = None) -> dict:
    """items: (image path or its bytes, label, sha256 of its bytes[, name]); the name (default: the path, else
    the sha256) is how messages and the report name the image. Writes the new bundle to `out` and returns the
    report; board_key (the board's private key): sign the new bundle as this board's derivation
    (edge_runtime/adapt/derive.py); cache_dir: keep each image's features there by content sha256
    (edge_runtime/adapt/cache.py), so a re-adaptation computes only the images it has not seen. Raises
    AdaptError / BundleError (nothing written)."""
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    bundle = load_bundle(bundle_path)
    check_out(out, bundle.root)
    replay = load_replay(bundle)
    inspector = Inspector(bundle, threads=threads)
    echo(f"adapt: {len(items)} labelled image(s) through {bundle.root} (its backbones, variant {bundle.variant})")
    names = [str(rest[0]) if rest else str(src) if isinstance(src, (str, os.PathLike))
             else f"image sha256 {digest[:16]}" for src, _, digest, *rest in items]
    digests = {name: digest for name, (_, _, digest, *_) in zip(names, items)}
    cache = FeatureCache(cache_dir, bundle) if cache_dir is not None else None
    fab, skipped, counts = features_of(inspector, [(src, label, name) for (src, label, *_), name in zip(items, names)],
                                       digests, cache, progress_lines(echo, t0))
    for name, reason in skipped:
        echo(f"adapt: skipped {name}: {reason}")
    t_features = time.perf_counter() - t0
    result = refit(bundle, fab, replay, [digests[p] for p in fab.paths], fab_weight=fab_weight, lam=lam,
                   folds=folds, target_recall=target_recall)
    report = {**result.report, "source": source, "skipped": [{"path": p, "reason": r} for p, r in skipped],
              "feature_seconds": round(t_features, 2), "features": counts}
    lineage = {"parent": {"bundle_id": bundle.bundle_id, "path": str(bundle.root)},
               "adapted": {"data_sha256": result.data_sha256, "images": report["images"],
                           "per_class": report["per_class"], "fab_weight": report["fab_weight"], "lambda": lam,
                           "source": source, "cross_validated": report["adapted_cross_validated"],
                           "current_bundle": report["current_bundle"]}}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    derive_bundle(bundle, out, heads=result.heads, gating=result.gating, extra=lineage,
                  board_key=board_key)
    (out / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    report["out"] = str(out)
    return report


def progress_lines(echo, t0: float, every: int = 25):
    """A progress callback for extract: a line every `every` images and at the end."""
    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            echo(f"adapt: features {done}/{total} ({time.perf_counter() - t0:.1f} s)")
    return progress


def features_of(inspector, items: list[tuple], digests: dict[str, str], cache: FeatureCache | None, progress
                ) -> tuple[FeatureSet, list[tuple[str, str]], dict]:
    """extract() for the images the cache does not hold (then stored in it), the cached features for the
    others, in the items' order. Returns (features, skipped, {"computed": n, "cached": n})."""
    todo = [it for it in items if cache is None or cache.get(digests[it[2]]) is None]
    fresh, skipped = extract(inspector, todo, progress)
    row_of = {name: k for k, name in enumerate(fresh.paths)}
    rows1, rows2, labels, paths, cached = [], [], [], [], 0
    for _src, label, name in items:
        hit = cache.get(digests[name]) if cache is not None else None
        if hit is None:
            if name not in row_of:
                continue                    # could not be decoded: in skipped
            f1, f2 = fresh.stage1[row_of[name]], fresh.stage2[row_of[name]]
            if cache is not None:
                cache.put(digests[name], f1, f2)
        else:
            f1, f2 = hit
            cached += 1
        rows1.append(f1)
        rows2.append(f2)
        labels.append(label)
        paths.append(name)
    if cache is not None:
        try:
            cache.save()
        except OSError as exc:          # a cache that cannot be written costs time next run, never this one
            log.warning("adapt: feature cache %s not written: %s", cache.path, exc.strerror or exc)
    d1, d2 = fresh.stage1.shape[1], fresh.stage2.shape[1]
    features = FeatureSet(np.asarray(rows1, np.float32).reshape(-1, d1), np.asarray(rows2, np.float32).reshape(-1, d2),
                          labels, paths)
    return features, skipped, {"computed": len(fresh), "cached": cached}


def summary(report: dict) -> str:
    """The report in a few lines: the adapted heads (cross-validated) beside the current bundle."""
    def line(name, m):
        spec = "n/a" if m["clean_specificity"] is None else f"{m['clean_specificity']:.2f}"
        rec = "n/a" if m["defect_recall"] is None else f"{m['defect_recall']:.3f}"
        return (f"  {name:<28} macro-F1 {m['macro_f1']:.3f}  clean specificity {spec}  defect recall {rec}  "
                f"({m['escapes']} escaped, {m['false_alarms']} clean flagged)")

    g = report["gating"]
    left_out = report.get("conflicts_left_out") or {"conflicts": 0, "items": []}
    conflicts = [f"  left out: {describe(c['sha256'], [(i['id'], i['label']) for i in c['images']])}"
                 for c in left_out["items"]]
    if conflicts:
        conflicts.insert(0, f"  {left_out['images']} image(s) left out: {left_out['conflicts']} image content(s) "
                            "whose labels disagree")
    return "\n".join([
        f"adapt: {report['images']} image(s) {report['per_class']} + {report['replay_images']} replay, fab weight "
        f"x{report['fab_weight']:g}, {report['folds']}-fold, {report['seconds']:.1f} s",
        line("adapted (cross-validated)", report["adapted_cross_validated"]),
        line("current bundle", report["current_bundle"]),
        f"  new gating: Stage-1 threshold {g['stage1_threshold']:.4f} (defect recall target "
        f"{report['target_defect_recall']}), review floor {g['stage2_review_floor']:.3f}",
        *conflicts,
        f"  new bundle: {report['out']} ({REPORT} inside)"])
