"""Minimal Linux inotify on one folder, through ctypes on the C library (no dependency).

    notifier = Inotify(folder)      # OSError where inotify is unavailable: the caller falls back to polling
    select([notifier.fd], ...); notifier.read() -> [(mask, name)]
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from pathlib import Path

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT = struct.Struct("iIII")


class Inotify:
    """Minimal inotify on one folder: read() -> [(mask, name)]."""

    MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

    def __init__(self, folder: Path):
        libc = ctypes.CDLL(None, use_errno=True)      # the C library the interpreter already uses
        if not hasattr(libc, "inotify_init1"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "no inotify in this C library")
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")

    def read(self) -> list[tuple[int, str]]:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size: offset + _EVENT.size + length].rstrip(b"\0")
            events.append((mask, os.fsdecode(raw)))
            offset += _EVENT.size + length
        return events

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
