"""The watch service's file operations: checking a folder before the service starts, moving an image to its
destination (a rename; across file systems copy + fsync + rename + unlink) and comparing two files' content."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from edge_runtime.digest import sha256_file
from edge_runtime.exits import WatchError


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


def same_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def move(src: Path, dest: Path) -> None:
    """Rename; across file systems copy to a hidden temporary, fsync, rename, then unlink the source."""
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        os.rename(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    src.unlink()
