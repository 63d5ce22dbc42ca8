"""systemd ``Type=notify`` support: READY, WATCHDOG, STATUS and STOPPING datagrams.

A few lines over the ``NOTIFY_SOCKET`` datagram socket instead of a dependency. The
watchdog ping is sent from the running control loop, so a hung loop (not just a dead
process) makes systemd restart the daemon.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends sd_notify messages when run under systemd; does nothing otherwise."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path:
            # A leading "@" names a socket in the abstract namespace.
            self._address = b"\0" + path[1:].encode() if path.startswith("@") else path
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """Half of systemd's WatchdogSec (from WATCHDOG_USEC), the usual ping period."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def notify(self, message: str) -> bool:
        """Send one message; never raises (losing a notification must not stop control)."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
