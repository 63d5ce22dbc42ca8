"""The BMS link as an :class:`~controller.core.integration.Integration`.

Each cycle's result gives it the telemetry to publish on its own period (the latest
frames), the alarms in force (re-raised every cycle: the link publishes only changes),
the alarms cleared and the one-off notices (escalation outcomes).
"""

from __future__ import annotations

import asyncio

from controller.core.result import CycleResult
from controller.core.view import NodeTelemetry
from controller.integrations.bms.bridge import BmsLink
from controller.support.retry import retry_forever


class BmsIntegration:
    name = "bms"

    def __init__(self, link: BmsLink) -> None:
        self.link = link
        self.telemetry: tuple[NodeTelemetry, ...] = ()

    def frames(self) -> tuple[NodeTelemetry, ...]:
        """The latest cycle's telemetry: the link's ``telemetry`` source."""
        return self.telemetry

    async def run(self, stop: asyncio.Event) -> None:
        await retry_forever("BMS link", self.link.run, stop)

    def publish(self, result: CycleResult) -> None:
        if result.telemetry:
            self.telemetry = result.telemetry
        for alarm in (*result.alarms, *result.notices):
            self.link.raise_alarm(alarm)
        for alarm_id in result.cleared:
            self.link.clear_alarm(alarm_id)

    async def aclose(self) -> None:
        await self.link.stop()
