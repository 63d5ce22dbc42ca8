"""The HTTP API served for real on loopback, for tests that talk to it over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from controller.integrations.api.app import ApiServer


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[tuple[ApiServer, httpx.AsyncClient]]:
    """Serve ``app`` on an ephemeral loopback port, with a client; stop the server after."""
    server = ApiServer(app, host="127.0.0.1", port=0)
    task = asyncio.create_task(server.serve())
    try:
        await asyncio.wait_for(server.wait_started(), 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield server, client
    finally:
        await server.shutdown()
        await asyncio.wait_for(task, 10)
