"""One watch service per folder and per database: exclusive locks taken at start-up.

Two instances on one folder race for the same files (one dies on "UNIQUE constraint failed" or "database is
locked", or both record the same image). So the service takes, without waiting:
    - an flock on the watch folder itself (works on a folder it may only read), and
    - an flock on DB.lock beside the database, holding this process's PID.
The kernel releases both when the process ends, however it ends (kill -9 included): a lock file left behind is
never stale. A second instance is refused with WatchError (exit 2) naming the first one's PID.
"""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from edge_runtime.config.service_config import lock_path
from edge_runtime.exits import WatchError

_LOCKS_LINE = re.compile(r"^\d+:\s+FLOCK\s+\S+\s+WRITE\s+(\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s")


def holder_pid(fd: int, lock_file: Path | None = None) -> int | None:
    """The PID holding an flock on the file open as `fd`: from /proc/locks (Linux), else the PID written in
    the lock file."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            for line in fh:
                m = _LOCKS_LINE.match(line)
                if m and (int(m[2], 16), int(m[3], 16), int(m[4])) == (os.major(st.st_dev), os.minor(st.st_dev),
                                                                       st.st_ino):
                    return int(m[1])
    except OSError:
        pass
    if lock_file is not None:
        try:
            return int(lock_file.read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return None


class ServiceLock:
    def __init__(self, watch: Path, db: Path):
        self._fds: list[int] = []
        try:
            self._take(os.open(watch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), f"watching {watch}", None)
            db.parent.mkdir(parents=True, exist_ok=True)
            path = lock_path(db)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise WatchError(f"{path}: cannot create the service's lock file: {exc.strerror or exc}") from None
            self._take(fd, f"using the result database {db}", path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _take(self, fd: int, what: str, lock_file: Path | None) -> None:
        self._fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(fd, lock_file)
            raise WatchError(f"another edge-inspect (pid {pid if pid is not None else 'unknown'}) is already "
                             f"{what}; stop it first (one service per folder and per database)") from None

    def release(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)        # closing the descriptor releases its flock
            except OSError:
                pass
        self._fds = []

    def __del__(self):
        self.release()
