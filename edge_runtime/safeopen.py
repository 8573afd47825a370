"""Opening a file that someone else controls: never block, regular files only.

open() on a FIFO waits for a writer, forever if none comes, and a signal cannot interrupt it usefully; a FIFO
or device can be swapped in under a name at any moment after it was checked. open_regular() opens with
O_NONBLOCK (and optionally O_NOFOLLOW) and checks the *opened* descriptor with fstat, so what is read is what
was checked. Used for dropped images (edge_runtime/service/recorder.py), hashing (edge_runtime/digest.py) and model
bundles (edge_runtime/bundle.py).

open_beneath() opens a file that must lie inside a folder (the review page's and export-labels' images in
processed/) without following any symbolic link below that folder: each folder on the way is entered relative
to the previous one's descriptor (openat with O_NOFOLLOW | O_DIRECTORY) and the file itself is opened with
O_NOFOLLOW, so a link swapped in at any moment fails the open instead of leading outside.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(OSError):
    """The path is a FIFO, socket, device, folder or symlink where a regular file was expected."""


class NotBeneath(OSError):
    """The path does not name a file inside the folder it must stay in (`..`, elsewhere, or a symbolic link on
    the way, which is not followed)."""


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
    return _regular(os.open(path, flags), path)


def _regular(fd: int, path) -> tuple[BinaryIO, os.stat_result]:
    """The descriptor as a blocking file object if fstat says it is a regular file; closed otherwise."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({kind_of(st.st_mode)})", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _relative(root: Path, path: Path) -> tuple[str, ...]:
    """The components of `path` below `root` (absolute paths: as written, else through their resolved folder, so
    a root reached by another name still matches); NotBeneath for a path that climbs or lies elsewhere."""
    if not path.is_absolute():
        parts = path.parts
    else:
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            try:
                parts = (*path.parent.resolve().relative_to(root).parts, path.name)
            except (ValueError, OSError, RuntimeError):
                raise NotBeneath(errno.EXDEV, f"not inside {root}", str(path)) from None
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise NotBeneath(errno.EXDEV, f"not inside {root}", str(path))
    return parts


def open_beneath(root: str | os.PathLike, path: str | os.PathLike) -> tuple[BinaryIO, os.stat_result]:
    """Open the regular file `path` (absolute, or relative to `root`) for reading, only if it lies inside the
    folder `root` with no symbolic link on the way below it; the file is opened once and checked on its
    descriptor (what is read is what was checked). NotBeneath when it lies elsewhere or a link is in the way
    (a link is never followed: ELOOP/ENOTDIR from the kernel become NotBeneath), NotRegularFile for a FIFO,
    device or folder, FileNotFoundError when it is missing."""
    root = Path(root)
    parts = _relative(root, Path(path))
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, dir_flags)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, dir_flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotBeneath(exc.errno, "a symbolic link (or not a folder) on the way; not followed",
                                     str(path)) from None
                raise
            os.close(fd)
            fd = nxt
        try:
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotBeneath(exc.errno, "a symbolic link; not followed", str(path)) from None
            raise
    finally:
        os.close(fd)
    return _regular(leaf, path)
