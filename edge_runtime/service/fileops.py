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
    """The file at a path is no longer the version that was read (replaced, rewritten). returned: where a file
    swapped in during the move was put back (a new input), if one was."""

    def __init__(self, message: str, returned: Path | None = None):
        super().__init__(message)
        self.returned = returned


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


def _same_version(st: os.stat_result, expect: FileSig) -> bool:
    """Whether a file seen after a rename is the version that was read: a rename changes the ctime of the
    file it moves, never its inode, size or mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (expect.dev, expect.ino, expect.size,
                                                                    expect.mtime_ns)


def _put_back(moved: Path, src: Path) -> Path:
    """Return a file that was moved by mistake to the folder it came from, as a new input: under its own name
    when that is free, else under a new one (link + unlink never replaces a file there)."""
    for n in range(1000):
        back = src if n == 0 else src.with_name(f"{src.stem}.returned-{n}{src.suffix}")
        try:
            os.link(moved, back, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(moved)
        return back
    raise FileChanged(f"{src}: cannot put back {moved} (no free name)")


def move(src: Path, dest: Path, expect: FileSig | None = None) -> Path | None:
    """Rename; across file systems copy to a new hidden temporary, fsync, rename, then unlink the source.
    expect: the source must still be this version of the file, else FileChanged and nothing is moved. A name
    is checked before it is renamed, so a file swapped in between those two steps is caught after the rename,
    by its inode, and put back as a new input. Returns where a file swapped in under the source's name after
    a copy was put back (a new input), or None."""
    _check(src, expect)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        if expect is not None and not _same_version(os.lstat(dest), expect):
            back = _put_back(dest, src)
            raise FileChanged(f"{src} was replaced while it was moved; the new file is back as {back.name}", back)
        return None
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
    return _unlink_copied(src, st)


def _unlink_copied(src: Path, copied: os.stat_result) -> Path | None:
    """Remove the source of a copy, unless another file was swapped in under its name: taken aside under a
    hidden name first, so only the copied inode is ever unlinked and the other one is put back as an input."""
    aside = src.with_name(f"{TEMP_PREFIX}{os.urandom(6).hex()}.moved")
    os.rename(src, aside)
    if (os.lstat(aside).st_dev, os.lstat(aside).st_ino) == (copied.st_dev, copied.st_ino):
        os.unlink(aside)
        return None
    return _put_back(aside, src)


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
