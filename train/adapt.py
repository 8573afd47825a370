"""`python -m train adapt --from BUNDLE --data DIR --out NEW_BUNDLE`: refit a bundle's heads on a fab's
labelled images centrally, with the same code the board runs (edge_runtime/adapt/run.py).

DIR is an `edge-inspect export-labels` folder or any class-folder layout `python -m train prepare` reads
(folder names mapped through the config's aliases). The bundle's taxonomy must be the config's. The same image
content under two class folders is left out and named by its paths (edge_runtime/review/conflicts.py, as on the
board). numpy and the TFLite interpreter only; seconds. Exit 0 written; 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import logging
import sys

from edge_runtime.adapt.refit import FOLDS, AdaptError
from edge_runtime.adapt.run import adapt, summary
from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.digest import sha256_file
from edge_runtime.interpreter import NoInterpreter
from train.config import ConfigError, load_config
from train.datasets import DatasetError, scan_source

PROG = "python -m train adapt"


def labelled_images(data: str, cfg) -> list[tuple[str, str, str]]:
    """(path, label, sha256) of every image of a class-folder source; the stage-1-only folders of the notebook
    layout carry no class and are left out."""
    scan = scan_source(data, cfg)
    return [(f.path, f.label, sha256_file(f.path)) for f in scan.files if f.label is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="bundle", required=True, metavar="BUNDLE", help="the bundle to adapt")
    p.add_argument("--data", required=True, metavar="DIR", help="the fab's labelled images (class folders)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the new bundle goes")
    p.add_argument("--config", help="config YAML (default configs/default.yaml): taxonomy and aliases")
    p.add_argument("--fab-weight", type=float, help="weight of the fab's images (default: the best of 4, 10, 30 "
                                                     "out of fold)")
    p.add_argument("--folds", type=int, default=FOLDS)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def fail(msg):
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

    if (args.fab_weight is not None and args.fab_weight <= 0) or args.folds < 2:
        return fail("--fab-weight must be > 0 and --folds >= 2")
    try:
        cfg = load_config(args.config)
        taxonomy = load_bundle(args.bundle, verify_all=False).taxonomy
        if list(taxonomy) != cfg.taxonomy.classes:
            return fail(f"{args.bundle}: the bundle's taxonomy {list(taxonomy)} is not the config's "
                        f"{cfg.taxonomy.classes}: it was trained for another set of classes")
        items = labelled_images(args.data, cfg)
        if not items:
            return fail(f"{args.data}: no labelled images")
        report = adapt(args.bundle, items, args.out, fab_weight=args.fab_weight, folds=args.folds,
                       threads=args.threads, target_recall=cfg.gating.target_defect_recall,
                       source=f"folder {args.data}", echo=lambda m: print(m, file=sys.stderr))
    except (ConfigError, DatasetError, AdaptError, BundleError, NoInterpreter) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write the new bundle: {exc.strerror or exc}")
    print(summary(report), file=sys.stderr)
    if report["conflicts_left_out"]["conflicts"]:
        print(f"{PROG}: the images left out are one content under two class folders: keep the copy in the right "
              "folder (or review it again on the board and export again)", file=sys.stderr)
    return 0
