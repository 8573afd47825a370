"""The exit statuses of every command (edge-inspect and its subcommands, the central collector, its API, rollouts),
and the error that stops the watch service until a person fixes something."""
from __future__ import annotations

EXIT_OK = 0         # all good
EXIT_FAILED = 1     # some input failed; the others were still processed (rollout: some board did not acknowledge)
EXIT_SETUP = 2      # a setup problem a person must fix (bundle, folder, permission, config, a bad flag)
EXIT_STORAGE = 3    # results could not be stored (disk full): the service stopped, no image was lost
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)


class WatchError(RuntimeError):
    """A problem a person must fix (folder missing, not a folder, no permission, a broken runtime): exit 2."""
