"""The HTTP API as an :class:`~controller.core.integration.Integration`.

It reads the controller's live view (``ControllerView``) on each request, so a cycle's
result changes nothing here: ``publish`` is a no-op.
"""

from __future__ import annotations

import asyncio

from controller.core.result import CycleResult
from controller.integrations.api.app import ApiServer


class ApiIntegration:
    name = "api"

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    async def run(self, stop: asyncio.Event) -> None:
        await self.server.serve()  # a bind failure is fatal: an API asked for must be there

    def publish(self, result: CycleResult) -> None:
        return None

    async def aclose(self) -> None:
        await self.server.shutdown()
