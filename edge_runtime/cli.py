"""edge-inspect: two-stage SEM defect inspection on the board.

    edge-inspect --models BUNDLE PATH...            files or folders (recursive): a table, or --json lines
    edge-inspect --models BUNDLE --watch DIR        the drop-folder service (see edge_runtime/service/watch.py)
    edge-inspect --config service.yaml              the service, configured by one validated file
    edge-inspect review --config service.yaml       the operator review page (edge_runtime/review/server.py)
    edge-inspect export-labels --config ... --out DIR
                                                    reviewed images as training data (edge_runtime/review/)
    edge-inspect adapt --config ... --out NEW_BUNDLE
                                                    refit the heads on the reviews, on the board (edge_runtime/adapt/)

The review commands take the service's database and processed folder from its config (--config), or from
--db DB [--processed DIR] (explicit flags win over the config).

Exit status: 0 all good; 1 some input failed (the others were still processed); 2 a setup problem a person
must fix (bundle, folder, permission, config); 3 the service stopped because results could not be stored
(disk full): no image was lost, restart once fixed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from edge_runtime.bundle import BundleError
from edge_runtime.command import CommandError, reported, run_command, setup_logging
from edge_runtime.config.service_config import (ConfigError, add_flags, check_inspect_flags, flag_values,
                                                load_service_config, service_flags_given)
from edge_runtime.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP, EXIT_STORAGE, WatchError
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


def _table_row(r) -> str:
    review = "REVIEW" if r.review else ""
    return (f"{r.label:<10} {r.stage1_score:>8.3f} {r.confidence:>6.3f} {review:<6} {r.latency_ms:>8.1f}  "
            f"{shown(r.path)}")


def run_batch(args) -> int:
    from edge_runtime.inspector import Inspector

    if not args.paths:
        raise CommandError("give image files or folders to inspect, or --watch DIR")
    with reported(BundleError, NoInterpreter):
        inspector = Inspector(args.models, variant=args.variant, threads=args.threads, runtime=args.runtime,
                              trusted_keys=args.trusted_keys, board_key=args.board_key)
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
            return EXIT_INTERRUPTED
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

    with reported(ConfigError):
        cfg = load_service_config(args.config, flag_values(args))
    setup_logging(cfg.log_level)
    return_large_blocks()       # decoded images' memory goes back to the system (edge_runtime/heap.py)
    try:
        with reported(BundleError, NoInterpreter, WatchError):
            service = WatchService(cfg)
    except StorageError as exc:      # full disk: 3; anything else (permissions, bad path): a setup error
        raise CommandError(str(exc), EXIT_STORAGE if exc.disk_full else EXIT_SETUP) from exc
    return service.run(once=args.once)


def inspect_or_watch(args) -> int:
    if args.watch is not None or args.config is not None:
        if args.paths:
            raise CommandError("give either PATHs to inspect or --watch DIR, not both")
        if args.json:
            raise CommandError("--json is for PATHs; the service writes JSON lines with --jsonl")
        return run_watch(args)
    service_only = (["--once"] if args.once else []) + service_flags_given(args)
    if service_only:
        raise CommandError(f"{service_only[0]} needs --watch DIR")
    if not args.models:
        raise CommandError("--models BUNDLE is required")
    with reported(ConfigError):
        check_inspect_flags(args)
    return run_batch(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    # --log-level is one of the service's settings (add_flags): run_watch sets logging up from the config
    return run_command(PROG, build_parser(), inspect_or_watch, argv, log_format=None)


if __name__ == "__main__":
    sys.exit(main())
