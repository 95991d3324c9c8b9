"""Ports on 127.0.0.1 for tests whose processes must agree on an address before anyone listens.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the same range every
outgoing connection on the machine takes its local port from. Between probing such a port and the
test's listener binding it, a connection made elsewhere (gloo's own sockets, another test run) can
take it, and the listener fails with EADDRINUSE. Ports below that range are never given to
outgoing connections, so a free one stays free unless another process picks the same port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10_000  # above the well-known and most registered service ports


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range where the system allows it."""
    top = _ephemeral_start()
    # Not the random module's shared state: tests seed it, and two runs would then probe alike.
    candidates = random.SystemRandom().sample(range(_LOWEST, top), min(64, top - _LOWEST)) if top > _LOWEST else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range on this machine
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
