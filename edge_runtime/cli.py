"""edge-inspect: two-stage SEM defect inspection on the board.

    edge-inspect --models BUNDLE PATH...            files or folders (recursive): a table, or --json lines
    edge-inspect --models BUNDLE --watch DIR        the drop-folder service (see edge_runtime/service/watch.py)
    edge-inspect --config service.yaml              the service, configured by one validated file
    edge-inspect review --db results.sqlite3        the operator review page (edge_runtime/review/server.py)
    edge-inspect export-labels --db ... --out DIR   reviewed images as training data (edge_runtime/review/)
    edge-inspect adapt --db ... --out NEW_BUNDLE    refit the heads on the reviews, on the board (edge_runtime/adapt/)

Exit status: 0 all good; 1 some input failed (the others were still processed); 2 a setup problem a person
must fix (bundle, folder, permission, config); 3 the service stopped because results could not be stored
(disk full): no image was lost, restart once fixed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge_runtime.bundle import BundleError
from edge_runtime.config.service_config import (ConfigError, add_flags, check_inspect_flags, flag_values,
                                                load_service_config, service_flags_given)
from edge_runtime.exits import EXIT_FAILED, EXIT_OK, EXIT_SETUP, EXIT_STORAGE, WatchError
from edge_runtime.heap import return_large_blocks
from edge_runtime.inputs import collect_inputs
from edge_runtime.interpreter import NoInterpreter
from edge_runtime.names import json_line, shown
from edge_runtime.preprocess import ImageError

PROG = "edge-inspect"
SUBCOMMANDS = {"review": "edge_runtime.review.server", "export-labels": "edge_runtime.review.export_labels",
               "adapt": "edge_runtime.adapt.board"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Two-stage SEM defect inspection with a model bundle.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 ok, 1 some input failed, 2 setup error, 3 storage full/failed")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (searched recursively)")
    w = p.add_argument_group("watch-folder service (each setting of the service config file is also a flag)")
    w.add_argument("--config", metavar="FILE", help="service config (YAML); command-line flags override it")
    w.add_argument("--once", action="store_true", help="process what is in the folder, then exit")
    add_flags(p, w)     # --models, --variant, --threads, --runtime here; the service's settings in the group
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return p


def _error(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _table_row(r) -> str:
    review = "REVIEW" if r.review else ""
    return (f"{r.label:<10} {r.stage1_score:>8.3f} {r.confidence:>6.3f} {review:<6} {r.latency_ms:>8.1f}  "
            f"{shown(r.path)}")


def run_batch(args) -> int:
    from edge_runtime.inspector import Inspector

    if not args.paths:
        return _error("give image files or folders to inspect, or --watch DIR", EXIT_SETUP)
    try:
        inspector = Inspector(args.models, variant=args.variant, threads=args.threads, runtime=args.runtime,
                              trusted_keys=args.trusted_keys)
    except (BundleError, NoInterpreter) as exc:
        return _error(str(exc), EXIT_SETUP)
    files, problems = collect_inputs(args.paths)
    out = sys.stdout
    failed = 0

    def fail(path, reason):
        nonlocal failed
        failed += 1
        print(f"{PROG}: {shown(path)}: {reason}", file=sys.stderr)
        if args.json:
            out.write(json_line({"path": str(path), "error": reason}) + "\n")

    for path, reason in problems:
        fail(path, reason)
    if not args.json:
        out.write(f"{'label':<10} {'P(defect)':>8} {'conf':>6} {'review':<6} {'ms':>8}  path\n")
    counts = {"clean": 0, "defective": 0, "review": 0}
    total_ms = 0.0
    for path in files:
        try:
            r = inspector.inspect(path)
        except ImageError as exc:
            fail(path, str(exc))
            continue
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:        # one bad input never stops the others
            fail(path, f"could not be inspected: {type(exc).__name__}: {exc}")
            continue
        counts["defective" if r.defect_class else "clean"] += 1
        counts["review"] += r.review
        total_ms += r.latency_ms
        out.write((json_line(r.to_dict()) if args.json else _table_row(r)) + "\n")
        out.flush()
    done = counts["clean"] + counts["defective"]
    print(f"{PROG}: {done} inspected ({counts['clean']} clean, {counts['defective']} defective, "
          f"{counts['review']} to review), {failed} failed"
          + (f"; mean {total_ms / done:.1f} ms/image" if done else ""), file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def run_watch(args) -> int:
    # The service's packages load only here: the one-off path above needs the runtime alone.
    from edge_runtime.db.store import StorageError
    from edge_runtime.service.watch import WatchService

    try:
        cfg = load_service_config(args.config, flag_values(args))
    except ConfigError as exc:
        return _error(str(exc), EXIT_SETUP)
    logging.basicConfig(level=getattr(logging, cfg.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    return_large_blocks()       # decoded images' memory goes back to the system (edge_runtime/heap.py)
    try:
        service = WatchService(cfg)
    except (BundleError, NoInterpreter, WatchError) as exc:
        return _error(str(exc), EXIT_SETUP)
    except StorageError as exc:      # full disk: 3; anything else (permissions, bad path): a setup error
        return _error(str(exc), EXIT_STORAGE if exc.disk_full else EXIT_SETUP)
    return service.run(once=args.once)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    watching = args.watch is not None or args.config is not None
    if watching:
        if args.paths:
            return _error("give either PATHs to inspect or --watch DIR, not both", EXIT_SETUP)
        if args.json:
            return _error("--json is for PATHs; the service writes JSON lines with --jsonl", EXIT_SETUP)
        return run_watch(args)
    service_only = (["--once"] if args.once else []) + service_flags_given(args)
    if service_only:
        return _error(f"{service_only[0]} needs --watch DIR", EXIT_SETUP)
    if not args.models:
        return _error("--models BUNDLE is required", EXIT_SETUP)
    try:
        check_inspect_flags(args)
    except ConfigError as exc:
        return _error(str(exc), EXIT_SETUP)
    return run_batch(args)


if __name__ == "__main__":
    sys.exit(main())
