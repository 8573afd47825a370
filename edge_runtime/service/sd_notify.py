"""systemd's notify protocol without a dependency: READY=1, WATCHDOG=1, STOPPING=1, STATUS=... as datagrams to
$NOTIFY_SOCKET (a path, or '@name' for an abstract socket). With Type=notify and WatchdogSec= in the unit,
systemd restarts a service that stops pinging; the watch loop pings, so a hung loop is restarted.
Outside systemd (no NOTIFY_SOCKET) every call does nothing."""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("edge_inspect")


class SdNotify:
    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Ping at half the watchdog interval, as sd_watchdog_enabled(3) advises.
        self.interval = int(usec) / 2e6 if watchdog and address else None
        self._next = 0.0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if address else None

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode("utf-8"), self.address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", message, exc)

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._next = time.monotonic()

    def watchdog(self) -> None:
        """Ping when due (call from the service's main loop)."""
        if self.interval is not None and time.monotonic() >= self._next:
            self.send("WATCHDOG=1")
            self._next = time.monotonic() + self.interval

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
