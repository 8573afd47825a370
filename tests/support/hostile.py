"""Hostile inputs and what they cost: file names and reviewed labels a hostile user may write, slow clients
holding connections, and a process's memory and thread count."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

# File names a drop folder may hold and labels a hostile user may write into the (group-writable) database.
HOSTILE_NAMES = ['=HYPERLINK("x").png', "-rf .png", "..png", "a\nb.png", "@SUM(1).png", "+1.png", "\tTAB.png",
                 "\u202egnp.exe", "back\\slash.png", "x" * 240 + ".png"]
HOSTILE_LABELS = ["../../escaped", "/tmp/sem-export-absolute", "..", "a/b", "clean\n", "", "X" * 40, "=cmd",
                  "../"]


def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM (MB) and Threads of a live process, from /proc ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def slow_clients(port: int, n: int) -> tuple[list[socket.socket], threading.Event]:
    """n connections: half trickle a request head a byte every 0.2 s, half send nothing. Set the event, then
    close the sockets, to end them."""
    stop = threading.Event()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]

    def trickle(s):
        head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: {'a' * 500}\r\n\r\n".encode()
        for i in range(len(head) - 4):
            if stop.wait(0.2):
                return
            try:
                s.send(head[i:i + 1])
            except OSError:
                return

    for s in socks[::2]:
        threading.Thread(target=trickle, args=(s,), daemon=True).start()
    return socks, stop
