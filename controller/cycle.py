"""The fixed-deadline control cycle: ``next += period``, missed ticks skipped, overruns counted.

Kept apart from what a cycle does so the timing can be tested on its own. A cycle that
runs long must not make the next ones run back-to-back to "catch up": stale catch-up
cycles act on old data. So the deadline advances by whole periods past now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class CycleStats:
    """Self-telemetry of the loop, read by metrics and the API."""

    cycles: int = 0
    overruns: int = 0
    skipped_ticks: int = 0
    last_duration_s: float = 0.0
    max_duration_s: float = 0.0
    durations_s: list[float] = field(default_factory=list)
    keep: int = 1000

    def record(self, duration_s: float) -> None:
        self.cycles += 1
        self.last_duration_s = duration_s
        self.max_duration_s = max(self.max_duration_s, duration_s)
        self.durations_s.append(duration_s)
        if len(self.durations_s) > self.keep:
            del self.durations_s[: len(self.durations_s) - self.keep]

    def percentile_s(self, q: float) -> float:
        """The q-quantile (0..1) of recent cycle durations (nearest rank)."""
        if not self.durations_s:
            return 0.0
        ordered = sorted(self.durations_s)
        k = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[k]


def next_deadline(deadline_s: float, period_s: float, now_s: float) -> tuple[float, int]:
    """The next deadline after ``deadline_s`` that is still in the future, and ticks skipped."""
    nxt = deadline_s + period_s
    if nxt > now_s:
        return nxt, 0
    skipped = math.floor((now_s - nxt) / period_s) + 1
    return nxt + skipped * period_s, skipped


async def wait_or_stop(stop: asyncio.Event, delay_s: float) -> None:
    """Sleep ``delay_s`` unless ``stop`` is set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay_s)


async def run_cycle(
    body: Callable[[float], Awaitable[None]],
    period_s: float,
    stats: CycleStats,
    stop: asyncio.Event,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[asyncio.Event, float], Awaitable[None]] = wait_or_stop,
) -> None:
    """Call ``body(now_s)`` every ``period_s`` on a monotonic deadline until ``stop`` is set.

    An exception in one cycle is logged and counted as an overrun; the loop goes on,
    because a controller that stops cycling leaves the racks to the agents' failsafe.
    """
    deadline = clock()
    while not stop.is_set():
        started = clock()
        try:
            await body(started)
        except Exception:
            log.exception("control cycle failed; continuing with the next one")
            stats.overruns += 1
        duration = clock() - started
        stats.record(duration)
        if duration > period_s:
            stats.overruns += 1
            log.warning("cycle took %.3f s, longer than its period %.3f s", duration, period_s)
        deadline, skipped = next_deadline(deadline, period_s, clock())
        stats.skipped_ticks += skipped
        await wait(stop, max(0.0, deadline - clock()))
