"""edge-inspect's exit statuses, and the error that stops the watch service until a person fixes something."""
from __future__ import annotations

EXIT_OK = 0         # all good
EXIT_FAILED = 1     # some input failed; the others were still processed
EXIT_SETUP = 2      # a setup problem a person must fix (bundle, folder, permission, config)
EXIT_STORAGE = 3    # results could not be stored (disk full): the service stopped, no image was lost


class WatchError(RuntimeError):
    """A problem a person must fix (folder missing, not a folder, no permission, a broken runtime): exit 2."""
