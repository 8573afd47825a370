"""The watch service's file operations: checking a folder before the service starts, opening an input without
blocking, moving an image to its destination, writing a quarantine note, and comparing two files' content.

Hostile folders: anyone who may drop files may also drop FIFOs, symlinks or long names, and may swap a file
after it was checked. So an input is opened without blocking and without following a symlink, and checked on
the opened descriptor (edge_runtime/safeopen.py); a move first checks that the file is still the version that
was read (move with `expect`); every file this service creates in its output folders is created new under a random hidden
name (O_CREAT | O_EXCL | O_NOFOLLOW, through tempfile.mkstemp) and renamed into place, which replaces a
planted symlink instead of writing through it.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import NamedTuple

from edge_runtime.digest import sha256_file
from edge_runtime.exits import WatchError
from edge_runtime.safeopen import open_regular

TEMP_PREFIX = ".edge-inspect-"      # hidden: the service never takes its own temporaries as input


class FileSig(NamedTuple):
    """What identifies one version of a file: a rename over it changes the inode, a write the size, mtime and
    ctime (ctime cannot be set back by the writer)."""
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileSig":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileChanged(Exception):
    """The file at a path is no longer the version that was read (replaced, rewritten)."""


def check_folder(path: Path, what: str, write: bool, create: bool) -> None:
    """Raise WatchError naming the folder unless it exists (created when `create`) and can be read (and
    written when `write`) by this process."""
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise WatchError(f"{what} {path}: cannot create it (permission denied)") from None
        except FileExistsError:
            raise WatchError(f"{what} {path}: exists but is not a folder") from None
        except OSError as exc:
            raise WatchError(f"{what} {path}: cannot create it: {exc.strerror or exc}") from None
    if not path.exists():
        raise WatchError(f"{what} {path}: no such folder")
    if not path.is_dir():
        raise WatchError(f"{what} {path}: not a folder")
    need = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if not os.access(path, need):
        raise WatchError(f"{what} {path}: no permission to {'read and write' if write else 'read'} it "
                         f"(running as uid {os.getuid()})")


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the folder's file system takes."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def same_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def _check(path: Path, expect: FileSig | None) -> None:
    if expect is not None and FileSig.of(os.lstat(path)) != expect:
        raise FileChanged(f"{path} changed since it was read")


def move(src: Path, dest: Path, expect: FileSig | None = None) -> None:
    """Rename; across file systems copy to a new hidden temporary, fsync, rename, then unlink the source.
    expect: the source must still be this version of the file, else FileChanged and nothing is moved."""
    _check(src, expect)
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fin, st = open_regular(src, follow_symlinks=False)
    with fin:
        if expect is not None and FileSig.of(st) != expect:
            raise FileChanged(f"{src} changed since it was read")
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=TEMP_PREFIX, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode))
                os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(fout.fileno())
            os.rename(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    src.unlink()


def write_new(path: Path, text: str) -> None:
    """Write a small text file at `path` in a folder of ours: created under a new random name, then renamed
    over `path` (a symlink planted there is replaced, never written through)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            os.fchmod(fh.fileno(), 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
