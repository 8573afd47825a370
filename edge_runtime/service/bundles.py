"""Bundles on the board's disk for rollouts: fetching an archive (resumable), unpacking it into a staging folder,
renaming it whole into a versioned folder, re-pointing the `models` symlink atomically, keeping the last few.

    BUNDLES_DIR/
        <bundle_id[:16]>/            one folder per bundle, complete and verified before it is renamed here
        .staging/<sha256>.tar.part   a download in progress (resumed with an HTTP Range request after a restart)
        .staging/<bundle_id[:16]>/   an archive being unpacked and checked (removed on any failure)
        rollout-state.json           the rollout agent's state (edge_runtime/service/rollout.py)

The service reads only folders that were renamed into BUNDLES_DIR after the one bundle reader accepted them
(sha256 of every file, the signature): a half bundle is never where the service reads.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import threading
from pathlib import Path

from edge_runtime.db.store import is_disk_full
from edge_runtime.digest import CHUNK, sha256_file
from edge_runtime.service.download import Cancelled, DownloadPolicy, FetchError, download

STAGING = ".staging"
STATE = "rollout-state.json"
ARCHIVE_MEMBER_LIMIT = 64


def version_dir(bundles_dir: Path, bundle_id: str) -> Path:
    return bundles_dir / bundle_id[:16]


def repoint(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target`, atomically (a new link renamed over the old one; the folder fsynced):
    a kill at any moment leaves the old target or the new one."""
    tmp = link.with_name(f".{link.name}.new-{os.getpid()}")
    if os.path.lexists(tmp):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fd = os.open(link.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def prune(bundles_dir: Path, keep: list[Path], at_most: int) -> list[Path]:
    """Remove versioned folders beyond the `at_most` newest of `keep` (current first, then the previous ones);
    folders not in `keep` go too. Returns what was removed."""
    kept = {p.resolve() for p in keep[:at_most]}
    removed = []
    for child in bundles_dir.iterdir():
        if child.name.startswith(".") or not child.is_dir() or child.is_symlink():
            continue
        if child.resolve() not in kept:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def clean_staging(staging: Path, keep: set[str]) -> None:
    """Remove what interrupted rollouts left in the staging folder, but the downloads named in `keep`."""
    if not staging.is_dir():
        return
    for child in staging.iterdir():
        if child.name.split(".")[0] in keep and child.name.endswith(".part"):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


class Fetcher(threading.Thread):
    """Download URL into PART under the one download policy (edge_runtime/service/download.py: resumed with a
    Range request after a restart, bounded by size, free space, time and rate), then check its sha256 and rename
    it to the archive path. `error` holds why it failed; `done` is set either way. cancel() stops it: its partial
    file is kept to be resumed unless `discard` (a rollout replaced or refused)."""

    def __init__(self, url: str, sha256: str, size: int | None, staging: Path, policy: DownloadPolicy,
                 on_done=None):
        super().__init__(name="rollout-fetch", daemon=True)
        self.url, self.sha256, self.size, self.policy = url, sha256, size, policy
        self.part = staging / f"{sha256}.tar.part"
        self.archive = staging / f"{sha256}.tar"
        self.error: FetchError | None = None
        self.resumed_from = 0
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._discard = False
        self._on_done = on_done or (lambda: None)

    def cancel(self, discard: bool = False) -> None:
        self._discard = self._discard or discard
        self._cancel.set()

    def run(self) -> None:
        try:
            self._fetch()
        except FetchError as exc:
            self.error = exc
        except OSError as exc:
            self.error = FetchError(f"{self.url}: {exc.strerror or exc}", is_disk_full(exc))
        except Exception as exc:            # a bug must not kill the service's thread: report it
            self.error = FetchError(f"{self.url}: {type(exc).__name__}: {exc}")
        finally:
            if self._discard or (self.error is not None and not isinstance(self.error, Cancelled)):
                self.part.unlink(missing_ok=True)
            self.done.set()
            self._on_done()

    def _fetch(self) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        if self.archive.exists():
            return
        self.resumed_from = download(self.url, self.part, self.size, self.policy, self._cancel)
        got = sha256_file(self.part)
        if got != self.sha256:
            size = self.part.stat().st_size
            self.part.unlink()          # a damaged download is not resumed: the next try starts over
            raise FetchError(f"{self.url}: sha256 mismatch ({size} bytes, sha256 {got[:16]}..., "
                             f"rollout says {self.sha256[:16]}...): damaged or not the published archive")
        os.replace(self.part, self.archive)


def unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack a bundle archive into a new folder `dest`: regular files with plain names only (no folders, links,
    devices or paths), at most ARCHIVE_MEMBER_LIMIT of them and max_bytes in all; FetchError otherwise."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    total = 0
    try:
        with tarfile.open(archive, "r:") as tar:
            for k, member in enumerate(tar):
                if k >= ARCHIVE_MEMBER_LIMIT:
                    raise FetchError(f"{archive}: more than {ARCHIVE_MEMBER_LIMIT} files")
                name = member.name
                if not member.isreg() or Path(name).name != name or name in ("", ".", "..") or name.startswith("."):
                    raise FetchError(f"{archive}: member {name[:80]!r} is not a plain file of the bundle")
                total += member.size
                if total > max_bytes:
                    raise FetchError(f"{archive}: unpacks to more than {max_bytes} bytes")
                src = tar.extractfile(member)
                fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
    except tarfile.TarError as exc:
        raise FetchError(f"{archive}: not a bundle archive ({exc})") from None
    except FileExistsError:
        raise FetchError(f"{archive}: a file name appears twice") from None
    except OSError as exc:
        raise FetchError(f"{archive}: cannot unpack: {exc.strerror or exc}", is_disk_full(exc)) from None
