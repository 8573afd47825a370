"""The one download policy of the board: how a rollout's archive is fetched from a file server that may lie,
stall or drip.

Every download is bounded by size (`max_bytes`, and the size the signed rollout message states), by the free
space it would leave on the disk (`reserve_bytes`), by total time (`total_seconds`) and by a minimum rate
(`min_rate` bytes/s over every `rate_window` seconds: a server that drips a byte every few seconds is dropped,
however short its pauses). A resumed download's `206` must start exactly at the offset asked and state the
size the message states; a redirect may not change the scheme, host or port. Whatever refuses a download also
removes its partial file, so a refused or abandoned download never spoils the next one or fills the disk; only a
download interrupted by the service stopping (cancel) is kept, to be resumed.
"""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.db.store import is_disk_full
from edge_runtime.digest import CHUNK

DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(RuntimeError):
    """A download or an archive that cannot be used; the message says why. `disk_full` for ENOSPC."""

    def __init__(self, message: str, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


class Cancelled(FetchError):
    """The download was stopped from outside (the service is stopping): its partial file is kept."""


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int
    total_seconds: float = 1800.0
    min_rate: float = 4096.0
    rate_window: float = 30.0
    read_timeout: float = 30.0
    reserve_bytes: int = 64 << 20


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is followed only to the same scheme, host and port (another path on the same server)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            raise FetchError(f"{req.full_url}: redirect to another server refused: {newurl[:200]!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class _Pace:
    """Total time and minimum rate over a sliding window."""

    def __init__(self, url: str, policy: DownloadPolicy, clock):
        self.url, self.policy, self.clock = url, policy, clock
        self.start = clock()
        self.window_start, self.window_bytes = self.start, 0

    def check(self, got: int) -> None:
        now = self.clock()
        self.window_bytes += got
        if now - self.start > self.policy.total_seconds:
            raise FetchError(f"{self.url}: not finished within {self.policy.total_seconds:g} s; refusing the rest")
        if now - self.window_start >= self.policy.rate_window:
            rate = self.window_bytes / (now - self.window_start)
            if rate < self.policy.min_rate:
                raise FetchError(f"{self.url}: {rate:.0f} bytes/s over the last {now - self.window_start:.0f} s, "
                                 f"under the minimum {self.policy.min_rate:g}; refusing the rest")
            self.window_start, self.window_bytes = now, 0


def _check_space(part: Path, needed: int, policy: DownloadPolicy) -> None:
    free = free_bytes(part.parent)
    if free - needed < policy.reserve_bytes:
        raise FetchError(f"{part.parent}: {free} bytes free; {needed} more would leave less than the "
                         f"{policy.reserve_bytes} bytes kept free", disk_full=True)


def _open(url: str, have: int, size: int | None, policy: DownloadPolicy):
    """The response to a GET (with a Range from `have`), or None when the partial file is already whole.
    Returns (response, offset the body starts at)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = _OPENER.open(request, timeout=policy.read_timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have and have == size:
            return None, have
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FetchError):
            raise exc.reason from None
        raise FetchError(f"{url}: {exc.reason}") from None
    if response.status == 200:
        return response, 0                  # no range support, or a fresh download: from the start
    if response.status != 206 or not have:
        response.close()
        raise FetchError(f"{url}: HTTP {response.status} to a request for bytes {have}-")
    m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not m or int(m.group(1)) != have or (size is not None and m.group(3) not in ("*", str(size))):
        response.close()
        raise FetchError(f"{url}: Content-Range {response.headers.get('Content-Range')!r} does not answer the "
                         f"request for bytes {have}- of {size if size is not None else '?'}")
    return response, have


def download(url: str, part: Path, size: int | None, policy: DownloadPolicy, cancel: threading.Event | None = None,
             clock=time.monotonic) -> int:
    """Fetch `url` into `part`, resuming what a stopped download left there. Returns the offset it resumed
    from. Raises FetchError (the partial file removed) or Cancelled (kept)."""
    cancel = cancel or threading.Event()
    try:
        return _download(url, part, size, policy, cancel, clock)
    except Cancelled:
        raise
    except FetchError:
        part.unlink(missing_ok=True)
        raise
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: {exc.strerror or exc}", is_disk_full(exc)) from exc


def _download(url, part: Path, size, policy: DownloadPolicy, cancel, clock) -> int:
    limit = min(policy.max_bytes, size) if size is not None else policy.max_bytes
    have = part.stat().st_size if part.exists() else 0
    if have > limit:
        part.unlink()
        have = 0
    _check_space(part, (size if size is not None else 0) - have, policy)
    response, have = _open(url, have, size, policy)
    if response is None:
        return have
    pace = _Pace(url, policy, clock)
    with response, open(part, "ab" if have else "wb") as out:
        total, since_space_check = have, 0
        while True:
            if cancel.is_set():
                raise Cancelled("cancelled")
            chunk = response.read1(CHUNK)       # what has arrived: progress on disk
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise FetchError(f"{url}: more than {limit} bytes; refusing the rest")
            out.write(chunk)
            since_space_check += len(chunk)
            if since_space_check >= 8 * CHUNK:
                _check_space(part, 0, policy)
                since_space_check = 0
            pace.check(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return have
