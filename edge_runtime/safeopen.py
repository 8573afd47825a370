"""Opening a file that someone else controls: never block, regular files only.

open() on a FIFO waits for a writer, forever if none comes, and a signal cannot interrupt it usefully; a FIFO
or device can be swapped in under a name at any moment after it was checked. open_regular() opens with
O_NONBLOCK (and optionally O_NOFOLLOW) and checks the *opened* descriptor with fstat, so what is read is what
was checked. Used for dropped images (edge_runtime/service/recorder.py), hashing (edge_runtime/digest.py) and model
bundles (edge_runtime/bundle.py).
"""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device, folder or symlink where a regular file was expected."""


def kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return kind
    return "regular file" if stat.S_ISREG(mode) else "special file"


def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading without ever blocking and return it with the fstat of the opened
    descriptor. NotRegularFile (an OSError) when it is anything else; ELOOP for a symlink when not following."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({kind_of(st.st_mode)})", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise
