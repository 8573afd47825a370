"""The watch service's settings, defined once.

Each setting is a typed field of ServiceConfig with its default, help text and checks (`setting(...)`). Everything
else is derived from those definitions:
    add_flags()             the `edge-inspect` command-line flags (type, choices, help, mutual exclusion)
    load_service_config()   a config file and command-line overrides, checked (check_setting) and resolved
    example_yaml()          edge_runtime/config/service.example.yaml; regenerate it with
                            `python -m edge_runtime.config.service_config > edge_runtime/config/service.example.yaml`
                            (a test compares the two)
A new setting is one field below plus its test.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import textwrap
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from edge_runtime import strict
from edge_runtime.interpreter import BACKENDS
from edge_runtime.netnames import BOARD_RULE, is_board_name, parse_host_names, parse_host_port
from edge_runtime.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODE_MB, DEFAULT_MAX_PIXELS

INSPECT = "inspect"     # a flag of one-off inspection too (edge-inspect --models B PATH...)
SERVICE = "service"     # a flag of the service only (with --watch DIR or --config FILE)
_NO_EXAMPLE = object()


class ConfigError(ValueError):
    """The service configuration is invalid; the message names the key."""


def setting(default, help: str, *, example=_NO_EXAMPLE, commented: bool = False, choices: tuple = (),
            minimum: float | None = None, maximum: float | None = None, positive: bool = False, path: bool = False, flag: str = SERVICE,
            metavar: str | None = None, exclusive: str | None = None, secret: bool = False):
    """One setting. help: the flag's help and the example file's comment; example: the value shown in the
    example file (default: the default), `commented` to show it as a commented-out line; choices / minimum
    / maximum (inclusive) / positive (> 0) / path (text, relative to the config file's folder): its checks; flag: INSPECT
    or SERVICE; exclusive: flags sharing this name exclude each other on the command line; secret: never shown
    (left out of repr, so a logged config cannot leak it)."""
    return field(default=default, repr=not secret, metadata={
        "help": help, "example": default if example is _NO_EXAMPLE else example, "commented": commented,
        "choices": tuple(choices), "minimum": minimum, "maximum": maximum, "positive": positive, "path": path, "flag": flag,
        "metavar": metavar, "exclusive": exclusive})


@dataclass
class ServiceConfig:
    models: str | None = setting(None, "model bundle folder (from `python -m convert`; sha256-checked at start)",
                                 example="/opt/sem-inspect/models/current", path=True, flag=INSPECT,
                                 metavar="BUNDLE")
    trusted_keys: str | None = setting(None, "accept only bundles signed by one of these Ed25519 public keys: a .pub "
                                       "file, or a folder whose *.pub files are all trusted (`python -m convert "
                                       "keygen`); checked before any model is read (unset: no signature needed)",
                                       example="/etc/sem-inspect/trusted-keys", commented=True, path=True,
                                       flag=INSPECT, metavar="PATH")
    board_key: str | None = setting(None, "this board's own Ed25519 private key (made at install; BOARD.pub beside "
                                    "it): `edge-inspect adapt` signs what it derives with it, and with trusted_keys "
                                    "a bundle this board derived from a trusted parent runs (docs/security.md, "
                                    "\"Bundles a board derives\"; unset: adapt writes unsigned bundles)",
                                    example="/etc/sem-inspect/board.key", commented=True, path=True, flag=INSPECT,
                                    metavar="FILE")
    watch: str | None = setting(None, "the drop folder to watch (flat: sub-folders are not entered)",
                                example="/srv/sem/incoming", path=True, metavar="DIR")
    processed: str | None = setting(None, "inspected images are moved here (default: WATCH/processed)",
                                    example="/srv/sem/processed", path=True, metavar="DIR", exclusive="destination")
    leave_in_place: bool = setting(False, "record results but leave inspected images where they are "
                                   "(instead of processed)", example=True, commented=True, exclusive="destination")
    quarantine: str | None = setting(None, "unusable files (corrupt, truncated, unsupported, oversized) go here "
                                     "with NAME.reason.txt (default: WATCH/quarantine)",
                                     example="/srv/sem/quarantine", path=True, metavar="DIR")
    db: str | None = setting(None, "SQLite results, WAL (default: WATCH/.edge-inspect.sqlite3); schema in "
                             "edge_runtime/db/store.py", example="/srv/sem/results.sqlite3", path=True, metavar="PATH")
    jsonl: str | None = setting(None, "also append each result to this JSONL file (optional)",
                                example="/srv/sem/results.jsonl", path=True, metavar="PATH")
    variant: str | None = setting(None, "model variant in the bundle (default: the bundle's default_variant)",
                                  example="int8", commented=True, flag=INSPECT, metavar="NAME")
    threads: int | None = setting(None, "interpreter threads (default: all cores)", example=2, commented=True,
                                  positive=True, flag=INSPECT, metavar="N")
    runtime: str | None = setting(None, "TFLite interpreter (default: the first installed)", example="litert",
                                  commented=True, choices=tuple(BACKENDS), flag=INSPECT)
    settle_seconds: float = setting(1.0, "a file is complete once its size and mtime hold still this long "
                                    "(files renamed into the folder: at once)", minimum=0.0, metavar="S")
    incomplete_seconds: float = setting(60.0, "a file that does not decode while it may still be written "
                                        "(truncated, empty, corrupt) is retried when it changes; quarantined once "
                                        "its writer closed it, it was renamed in, or it was left alone this long",
                                        minimum=0.0, metavar="S")
    poll_seconds: float = setting(1.0, "polling interval when inotify is unavailable", positive=True, metavar="S")
    rescan_seconds: float = setting(30.0, "full rescan interval with inotify (a safety net)", positive=True,
                                    metavar="S")
    inotify: str = setting("auto", "see new files through inotify (auto: when available; on: required) or "
                           "always poll (off)", choices=("auto", "on", "off"))
    summary_seconds: float = setting(300.0, "one summary line this often, only when something happened (0: never)",
                                     minimum=0.0, metavar="S")
    max_file_bytes: int = setting(DEFAULT_MAX_BYTES, "larger files are quarantined unread", positive=True,
                                  metavar="N")
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, "larger images are quarantined", positive=True, metavar="N")
    max_decode_mb: float = setting(float(DEFAULT_MAX_DECODE_MB), "memory budget for decoding one image (file bytes + "
                                   "decoded pixels + 8-bit copy, estimated from its header before decoding); images "
                                   "that need more are quarantined", positive=True, metavar="MB")
    max_pending: int = setting(10000, "files tracked at once (bounded memory); more are found by later scans",
                               positive=True, metavar="N")
    commit_every: int = setting(16, "group commit: at most this many results per transaction ...", positive=True,
                                metavar="N")
    commit_seconds: float = setting(0.5, "... held open at most this long while more files are waiting",
                                    minimum=0.0, metavar="S")
    durability: str = setting("full", "full: each commit fsynced (survives power loss); normal: survives "
                              "process kills only", choices=("full", "normal"))
    log_level: str = setting("INFO", "log verbosity", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # -- bundles: swap, shadow, rollouts (edge_runtime/service/bundles.py, shadow.py, rollout.py) ------------
    shadow: str | None = setting(None, "a candidate bundle to run beside the current one on live images; its answers "
                                 "are stored apart (shadow_results) and never replace a result",
                                 example="/opt/sem-inspect/models/candidate", commented=True, path=True,
                                 metavar="BUNDLE")
    shadow_fraction: float = setting(1.0, "the fraction of images the candidate also inspects (0..1; chosen by the "
                                     "image's sha256, so the same image always gets the same answer)",
                                     minimum=0.0, maximum=1.0, metavar="F")
    bundles_dir: str | None = setting(None, "rollouts from the central side (needs mqtt): bundles are fetched into "
                                      "this folder (one versioned sub-folder each), shadowed, then `models` (a "
                                      "symlink) is re-pointed; unset: rollout messages are refused",
                                      example="/var/lib/sem-inspect/bundles", commented=True, path=True,
                                      metavar="DIR")
    bundle_keep: int = setting(3, "bundles kept in bundles_dir (the current one, the previous ones for rollback)",
                               positive=True, metavar="N")
    rollout_max_bytes: int = setting(1 << 30, "largest bundle archive a rollout may fetch", positive=True,
                                     metavar="N")
    rollout_fetch_seconds: float = setting(1800.0, "a rollout's download is dropped when not finished in this "
                                           "many seconds", positive=True, metavar="S")
    rollout_min_rate: float = setting(4096.0, "a rollout's download is dropped when it brings fewer bytes per "
                                      "second than this over any 30 s (a server that drips)", minimum=0.0,
                                      metavar="BYTES_PER_S")
    rollout_reserve_bytes: int = setting(64 << 20, "free disk space a rollout's download must leave in bundles_dir",
                                         minimum=0, metavar="N")
    # -- fleet (edge_runtime/fleet/publisher.py, http_api.py; needs `pip install "sem-inspect[fleet]"`) --
    board: str | None = setting(None, "this board's name in MQTT topics and the HTTP API (default: the host name)",
                                example="sem-tool-07", commented=True, metavar="NAME")
    mqtt: str | None = setting(None, "publish each result to this MQTT broker, HOST:PORT (off when unset)",
                               example="broker.fab.local:8883", commented=True, metavar="HOST:PORT")
    mqtt_prefix: str = setting("sem-inspect", "topic prefix: PREFIX/<board>/result, /status, /stats",
                               metavar="PREFIX")
    mqtt_username: str | None = setting(None, "MQTT user name", example="board07", commented=True, metavar="NAME")
    mqtt_password: str | None = setting(None, "MQTT password (never logged; keep this file mode 0640)",
                                        example="change-me", commented=True, metavar="TEXT", secret=True)
    mqtt_tls: bool = setting(False, "connect to the broker over TLS (certificates checked)", example=True,
                             commented=True)
    mqtt_ca: str | None = setting(None, "CA certificate file for TLS (default: the system's)",
                                  example="/etc/sem-inspect/broker-ca.pem", commented=True, path=True,
                                  metavar="PATH")
    mqtt_stats_seconds: float = setting(60.0, "a stats message this often", positive=True, metavar="S")
    http: str | None = setting(None, "serve /healthz, /metrics, /results and POST /inspect on HOST:PORT (off when "
                               "unset; 127.0.0.1 is this machine only)", example="127.0.0.1:8080", commented=True,
                               metavar="HOST:PORT")
    http_token: str | None = setting(None, "require `Authorization: Bearer TOKEN` on every HTTP request except "
                                     "/healthz (never logged)", example="change-me", commented=True,
                                     metavar="TOKEN", secret=True)
    http_max_bytes: int = setting(20 * 2**20, "largest image accepted by POST /inspect", positive=True,
                                  metavar="N")
    http_allowed_hosts: str | None = setting(None, "host names (or addresses) besides the one in `http:` that "
                                             "clients use to reach the HTTP API, comma-separated; a request whose "
                                             "Host is none of them is refused (DNS rebinding)",
                                             example="sem-tool-07,sem-tool-07.fab.local", commented=True,
                                             metavar="NAMES")

    def resolved(self) -> "ServiceConfig":
        """Check every value, fill the defaults that depend on the watch folder, check the folders."""
        for f in fields(self):
            if getattr(self, f.name) is not None:
                check_setting(f.name, getattr(self, f.name))
        if not self.models:
            raise ConfigError("models: the bundle folder is required (--models or `models:` in the config)")
        if not self.watch:
            raise ConfigError("watch: the folder to watch is required (--watch or `watch:` in the config)")
        if self.leave_in_place and self.processed:
            raise ConfigError("processed and leave_in_place exclude each other")
        watch = Path(self.watch).expanduser()
        out = replace(self, watch=str(watch),
                      processed=None if self.leave_in_place else
                      str(Path(self.processed).expanduser() if self.processed else watch / "processed"),
                      quarantine=str(Path(self.quarantine).expanduser() if self.quarantine else watch / "quarantine"),
                      db=str(Path(self.db).expanduser() if self.db else watch / ".edge-inspect.sqlite3"))
        for name, parse in (("mqtt", parse_host_port), ("http", parse_host_port),
                            ("http_allowed_hosts", parse_host_names)):
            if getattr(out, name):
                try:
                    parse(getattr(out, name))
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        if self.bundles_dir and not self.mqtt:
            raise ConfigError("bundles_dir: rollouts arrive over MQTT: set mqtt too")
        if self.bundles_dir and not self.trusted_keys:
            raise ConfigError("bundles_dir: a board that takes rollouts must check their signatures: set "
                              "trusted_keys (the release key's .pub)")
        if (self.mqtt_username is None) != (self.mqtt_password is None):
            raise ConfigError("mqtt_username and mqtt_password go together")
        if self.mqtt_ca and not self.mqtt_tls:
            raise ConfigError("mqtt_ca needs mqtt_tls: true")
        if not out.board:
            out = replace(out, board=socket.gethostname())
        if not is_board_name(out.board):
            raise ConfigError(f"board: {out.board!r} must be {BOARD_RULE} (it is an MQTT topic level)")
        if "#" in out.mqtt_prefix or "+" in out.mqtt_prefix or not out.mqtt_prefix.strip("/"):
            raise ConfigError(f"mqtt_prefix: {out.mqtt_prefix!r} must be a topic without wildcards")
        for name in ("processed", "quarantine"):
            value = getattr(out, name)
            if value and Path(value).resolve() == watch.resolve():
                raise ConfigError(f"{name}: must be a different folder from the watch folder")
        if out.jsonl:
            db_files = own_files(replace(out, jsonl=None))
            if any(_same_file(out.jsonl, f) for f in db_files):
                raise ConfigError(f"jsonl: {out.jsonl} is the result database (or one of its files, "
                                  f"{', '.join(f.name for f in db_files)}): give the JSONL file its own path")
        return out


def inspector_args(cfg: ServiceConfig) -> dict:
    """The Inspector's keyword arguments from the config (variant, threads, runtime, trusted keys, the board's key
    and every decode limit): the one place the watch service, its swaps, shadows and rollouts, and POST /inspect
    build their inspectors from."""
    return {"variant": cfg.variant, "threads": cfg.threads, "runtime": cfg.runtime, "trusted_keys": cfg.trusted_keys,
            "board_key": cfg.board_key,
            "max_pixels": cfg.max_image_pixels, "max_bytes": cfg.max_file_bytes, "max_decode_mb": cfg.max_decode_mb}


def lock_path(db: Path) -> Path:
    """DB.lock beside the database: the watch service's instance lock (edge_runtime/service/lock.py)."""
    return db.with_name(db.name + ".lock")


def own_files(cfg: ServiceConfig) -> list[Path]:
    """The files the service itself writes beside its inputs: the database with its WAL, shared-memory and
    lock files, and the JSONL file. Where they sit in the watch folder they are never taken as images."""
    db = Path(cfg.db)
    files = [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal")), lock_path(db)]
    return files + ([Path(cfg.jsonl)] if cfg.jsonl else [])


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """The same path once resolved, or (both existing) the same file under two names."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


SETTINGS = {f.name: f for f in fields(ServiceConfig)}
_HINTS = typing.get_type_hints(ServiceConfig)


def kind_of(name: str) -> type:
    """The value type of a setting: str, int, float or bool (None = unset is allowed where the default is None)."""
    hint = _HINTS[name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _spec(name: str) -> strict.Spec:
    """A setting's value as edge_runtime/strict.py checks it (an int is accepted for a float, never a bool)."""
    meta, kind = SETTINGS[name].metadata, kind_of(name)
    if kind is bool:
        return strict.Boolean()
    if kind is str:
        return strict.Text(choices=meta["choices"], describe="a path (text)" if meta["path"] else "")
    return strict.Number(low=meta["minimum"], high=meta["maximum"], above=0 if meta["positive"] else None,
                         integer=kind is int)


SPECS = {name: _spec(name) for name in SETTINGS}
# A config file: these settings and nothing else; null leaves a setting unset.
FILE_SPEC = strict.Keys({name: strict.Field(strict.Optional(spec), None) for name, spec in SPECS.items()})


def check_setting(name: str, value):
    """The value, checked against its setting (an int is accepted for a float); ConfigError naming it if not."""
    if name not in SETTINGS:
        raise ConfigError(f"unknown setting {name!r}")
    return strict.read(value, SPECS[name], root=name, error=ConfigError)


def _read_file(cfg_path: Path) -> dict:
    try:
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: service config file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read service config: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a mapping of settings")
    checked = strict.read(raw, FILE_SPEC, str(cfg_path), error=ConfigError)
    values = {}
    for key in raw:
        if checked[key] is not None:
            path = SETTINGS[key].metadata["path"]
            values[key] = str(cfg_path.parent / Path(checked[key]).expanduser()) if path else checked[key]
    return values


def load_service_config(path: str | os.PathLike | None, overrides: dict | None = None) -> ServiceConfig:
    """Read a service YAML file (unknown keys and wrong types are errors), then apply non-None overrides
    (command-line flags). Relative paths in the file are relative to the file's folder."""
    values = _read_file(Path(path)) if path is not None else {}
    overrides = overrides or {}
    for key, value in overrides.items():
        if value is not None:
            values[key] = check_setting(key, value)
        elif key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r}")
    if values.get("leave_in_place") and overrides.get("leave_in_place") is None and overrides.get("processed"):
        values["leave_in_place"] = False     # --processed on the command line overrides the file
    if overrides.get("leave_in_place"):
        values.pop("processed", None)        # --leave-in-place on the command line overrides the file
    return ServiceConfig(**values).resolved()


# ---- derived: command-line flags -------------------------------------------------------------------------
def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, service_group) -> None:
    """One flag per setting (default None: unset, the config file or the setting's default applies):
    INSPECT settings on `parser`, SERVICE settings in `service_group`."""
    exclusive = {}
    for f in fields(ServiceConfig):
        meta, kind = f.metadata, kind_of(f.name)
        target = parser if meta["flag"] == INSPECT else service_group
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        shown = f.default not in (None, False) and "default" not in meta["help"]
        kwargs = {"dest": f.name, "default": None,
                  "help": meta["help"] + (f" (default: {f.default})" if shown else "")}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=kind, metavar=meta["metavar"], choices=meta["choices"] or None)
        target.add_argument(flag_name(f.name), **kwargs)


def flag_values(args: argparse.Namespace) -> dict:
    """The settings given on the command line, as load_service_config overrides."""
    return {name: getattr(args, name) for name in SETTINGS}


def check_inspect_flags(args: argparse.Namespace) -> None:
    """One-off inspection: the INSPECT settings given on the command line, checked as in a config file."""
    for name, f in SETTINGS.items():
        if f.metadata["flag"] == INSPECT and getattr(args, name) is not None:
            check_setting(name, getattr(args, name))


def service_flags_given(args: argparse.Namespace) -> list[str]:
    """Flags of SERVICE settings present on the command line (they need --watch DIR)."""
    return [flag_name(n) for n, f in SETTINGS.items() if f.metadata["flag"] == SERVICE and getattr(args, n) is not None]


# ---- derived: the example file ---------------------------------------------------------------------------
EXAMPLE_HEADER = """\
# edge-inspect --config service.yaml : the watch-folder service, one validated file.
# Unknown keys and wrong types stop the service with an error naming the key; command-line flags override
# any value here. Relative paths are relative to this file's folder.
# Generated from edge_runtime/config/service_config.py (python -m edge_runtime.config.service_config): every setting, with
# its default unless an example value is more telling; commented-out lines are optional.
"""


def example_yaml(width: int = 110) -> str:
    """Every setting: its help as a comment, then `key: value` (commented out where the setting is optional)."""
    lines = [EXAMPLE_HEADER]
    for f in fields(ServiceConfig):
        meta = f.metadata
        note = meta["help"] + (f" [{' | '.join(meta['choices'])}]" if meta["choices"] else "")
        value = yaml.safe_dump({f.name: meta["example"]}, default_flow_style=False, width=1000).strip()
        lines += ["\n"] + [f"# {text}\n" for text in textwrap.wrap(note, width - 2)]
        lines.append(("# " if meta["commented"] else "") + value + "\n")
    return "".join(lines)


if __name__ == "__main__":
    sys.stdout.write(example_yaml())
