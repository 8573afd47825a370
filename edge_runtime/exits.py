"""The exit statuses of every command (edge-inspect and its subcommands, the central collector, its API, rollouts),
the error that stops the watch service until a person fixes something (2), the one that says results cannot be
stored (3), and the timestamp every stored record carries."""
from __future__ import annotations

EXIT_OK = 0         # all good
EXIT_FAILED = 1     # some input failed; the others were still processed (rollout: some board did not acknowledge)
EXIT_SETUP = 2      # a setup problem a person must fix (bundle, folder, permission, config, a bad flag)
EXIT_STORAGE = 3    # results could not be stored (disk full): the service stopped, no image was lost
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class WatchError(RuntimeError):
    """A problem a person must fix (folder missing, not a folder, no permission, a broken runtime): exit 2."""


class StorageError(RuntimeError):
    """Results cannot be stored (disk full, read-only, I/O error, a database away): exit 3 with `disk_full`, an
    HTTP server's 503. The board's store raises it, and the central storage a subclass of it."""

    def __init__(self, message: str, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


def utc_now() -> str:
    """The one timestamp form every stored record carries: UTC, ISO-8601, milliseconds."""
    import datetime as _dt
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
