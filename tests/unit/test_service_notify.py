"""The running service tells systemd it is READY and feeds the WATCHDOG from its loop.

A real datagram socket stands in for systemd's NOTIFY_SOCKET (what `Type=notify` gives a
service); the service runs in-process on a small site whose meters are absent, which
must not keep it from cycling.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from controller.model.loader import parse_site
from controller.service import ServiceOptions, run_service
from tests.sites import tiny_site


async def test_ready_then_watchdog_from_the_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    cfg = tiny_site()
    cfg["policy"] = {"cycle_s": 0.1}
    stop = asyncio.Event()
    service = asyncio.create_task(
        run_service(parse_site(cfg), ServiceOptions(api=False, install_signals=False), stop)
    )
    loop = asyncio.get_running_loop()
    messages: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while not any(m == b"WATCHDOG=1" for m in messages):
                messages.append(await loop.sock_recv(sock, 4096))
    finally:
        stop.set()
        code = await asyncio.wait_for(service, 20)
        sock.close()
    assert code == 0
    assert messages[0].startswith(b"READY=1")
    assert messages.index(b"WATCHDOG=1") > 0
