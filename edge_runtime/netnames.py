"""Names that cross the network, one rule each: HOST:PORT, HTTP host names, board names (used by the board's
settings and by the central side alike)."""
from __future__ import annotations

import ipaddress
import re


def parse_host_port(value: str) -> tuple[str, int]:
    """HOST:PORT ([::1]:PORT for IPv6); port 0 picks a free one (HTTP only)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})|([^:\[\]\s]+):([0-9]{1,5})", value or "")
    if not m:
        raise ValueError(f"{value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port must be 0..65535")
    return host, int(port)


BOARD_RULE = "1-64 letters, digits, '.', '_' or '-'"


def is_board_name(name) -> bool:
    """A board's name: an MQTT topic level, the key of its results at the collector, its MQTT user name under
    the broker's ACL (deploy/mosquitto-acl.conf)."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) is not None


_DNS_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def canonical_host(name: str) -> str | None:
    """A host name as HTTP servers compare it: a DNS name lowercased without a trailing dot, or an IP address
    in its canonical form (IPv6 without brackets); None when it is neither."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    name = name.rstrip(".")
    return name if len(name) <= 253 and _DNS_NAME.fullmatch(name) else None


def parse_host_names(value: str | None) -> tuple[str, ...]:
    """http_allowed_hosts (and `edge-inspect review --allowed-hosts`): comma-separated host names or addresses
    -> their canonical forms; ValueError naming one that is neither."""
    names = []
    for raw in (value or "").split(","):
        if raw.strip():
            name = canonical_host(raw)
            if name is None:
                raise ValueError(f"{raw.strip()!r} is not a host name or IP address")
            names.append(name)
    return tuple(names)
