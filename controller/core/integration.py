"""The one shape every integration has: a name, a task, a publish of each cycle's result.

Why: the service used to wire each integration into the controller by hand through
callback attributes; now it builds a list of :class:`Integration`, runs each one's
``run`` in one TaskGroup and hands every :class:`~controller.core.result.CycleResult` to
each one's ``publish``, through :func:`deliver`, which isolates them: a publisher that
raises is counted and logged as a failure of the ``deliver`` phase and the next one still
gets the result. ``publish`` runs on the cycle's thread, so it must not block (queue,
don't send); the cycle has sent its leases before any publish runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, runtime_checkable

from controller.core.phases import PhaseRunner
from controller.core.result import CycleResult

DELIVER = "deliver"  # the phase after publish: handing the result to the integrations


@runtime_checkable
class Integration(Protocol):
    """Something outside the core that the service runs and feeds each cycle's result."""

    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Its own work until ``stop`` (reconnects, retries); may return at once."""

    def publish(self, result: CycleResult) -> None:
        """Take one cycle's result; must not block, should not raise (isolated if it does)."""

    async def aclose(self) -> None:
        """Flush and stop; called once at shutdown, after the last cycle."""


def deliver(result: CycleResult, integrations: Iterable[Integration], phases: PhaseRunner) -> None:
    """Hand ``result`` to each integration; a failing one never stops the others."""
    with phases.run(DELIVER):
        for integration in integrations:
            with phases.run(DELIVER, integration.name):
                integration.publish(result)


class TaskIntegration:
    """A plain task run beside the cycle (a demo's agents, a reporter): nothing to publish."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._run = run

    async def run(self, stop: asyncio.Event) -> None:
        await self._run()

    def publish(self, result: CycleResult) -> None:
        return None

    async def aclose(self) -> None:
        return None
