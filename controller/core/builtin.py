"""The integrations every controller service runs: the agent link, loop metrics, watchdog.

Kept here, beside the cycle, because they are about the controller itself (its wire to
the agents, its own health), not about a site's outside systems; controller/service.py
lists them with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib

from controller.agentlink.transport import ControllerLink, MqttControllerLink
from controller.core.controller import Controller
from controller.core.result import CycleResult
from controller.support.retry import retry_forever
from controller.support.sdnotify import Notifier
from drivers.base import PollGroup


class AgentLinkIntegration:
    """Leases out (sent by the cycle itself), telemetry in; both retried on failure."""

    name = "agent-link"

    def __init__(self, link: ControllerLink, controller: Controller) -> None:
        self.link = link
        self._controller = controller

    async def _read(self) -> None:
        async for t in self.link.telemetry():
            self._controller.accept_telemetry(t)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(retry_forever("agent link", self.link.run, stop), name="agent-link")
            tg.create_task(retry_forever("agent telemetry", self._read, stop), name="telemetry")

    def publish(self, result: CycleResult) -> None:
        return None

    async def aclose(self) -> None:
        await self.link.stop()


class LoopMetrics:
    """The loop's own series after each cycle: cycle time, poll times, agent link refusals."""

    name = "metrics"

    def __init__(self, controller: Controller, group: PollGroup, link: ControllerLink | None):
        self._controller = controller
        self._group = group
        self._link = link

    async def run(self, stop: asyncio.Event) -> None:
        return None

    def publish(self, result: CycleResult) -> None:
        metrics = self._controller.metrics
        # Overruns reach the metrics through the cycle timer's on_overrun, the one place
        # that decides what an overrun is. These are the previous cycle's figures.
        stats = self._controller.cycle_stats
        metrics.observe_cycle(stats.last_duration_s, cpu_s=stats.last_cpu_s)
        for dev, st in self._group.stats().items():
            if st.last_poll_duration_s is not None:
                # Errors are counted by kind in rackpower_device_errors_total; the last
                # error's text is a device's own words, never a label.
                metrics.observe_poll(dev, st.last_poll_duration_s)
        if isinstance(self._link, MqttControllerLink):  # the in-process link neither signs
            ls = self._link.stats()  # nor refuses
            metrics.set_agent_link(ls.auth_refused, ls.leases_no_key)

    async def aclose(self) -> None:
        return None


class Watchdog:
    """Feeds systemd's watchdog, but only while cycles complete (a turning loop)."""

    name = "watchdog"

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._cycles = 0

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._notifier.watchdog_interval_s() or 5.0
        while not stop.is_set():
            last = self._cycles
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if self._cycles > last:
                self._notifier.watchdog()

    def publish(self, result: CycleResult) -> None:
        self._cycles += 1

    async def aclose(self) -> None:
        return None
