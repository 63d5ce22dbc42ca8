"""The TSDB writer as an :class:`~controller.core.integration.Integration`.

Each cycle's points are queued with the writer's own counters (same timestamp, as
docs/tsdb-schema.md says); the writer's thread sends them, so publish never blocks.
"""

from __future__ import annotations

import asyncio
import time

from controller.core.metrics import Metrics
from controller.core.result import CycleResult
from controller.integrations.tsdb.writer import TsdbWriter, tsdb_point


class TsdbIntegration:
    name = "tsdb"

    def __init__(self, writer: TsdbWriter, site: str, metrics: Metrics) -> None:
        self.writer = writer
        self._site = site
        self._metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        self.writer.start()  # its own thread sends; nothing else to run here

    def publish(self, result: CycleResult) -> None:
        if not result.points:
            return  # the publish phase did not run (a failed read or decide)
        w = self.writer
        ts_ns = result.points[0].ts_ns if result.points else time.time_ns()
        w.submit([*result.points, tsdb_point(self._site, w.stats(), ts_ns=ts_ns)])
        self._metrics.set_tsdb_dropped(w.stats().dropped_points)

    async def aclose(self) -> None:
        await self.writer.aclose()
