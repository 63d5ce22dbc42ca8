"""Free loopback ports for the servers a test starts (one place, not one per fixture).

The kernel picks a port nobody listens on right now; a small race with another process
remains, which is why every server fixture reads back that its server is up.
"""

from __future__ import annotations

import socket


def _free(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return _free(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A free UDP port on 127.0.0.1 (SNMP agents)."""
    return _free(socket.SOCK_DGRAM)
