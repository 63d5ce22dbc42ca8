"""The fixed-deadline control cycle: ``next += period``, missed ticks skipped, overruns counted.

Kept apart from what a cycle does so the timing can be tested on its own. A cycle that
runs long must not make the next ones run back-to-back to "catch up": stale catch-up
cycles act on old data. So the deadline advances by whole periods past now.

An overrun is any tick that did not do its job on time: a cycle longer than its period,
a cycle that raised, and a cycle that *started* more than a period after its deadline.
The last is the event loop held by something else (audit F1: a 63 MB request body
parsed for 3 s stopped the cycle, and the stall was invisible because only durations
were compared).

Each cycle's CPU time (this thread's, ``time.thread_time``) is kept beside its wall
time: on a shared machine the wall time also counts every preemption by other
processes, so only the CPU time says whether the cycle itself got more work (issue 11:
a BMS flood must not slow the cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

OverrunKind = Literal["late", "failed", "long"]


@dataclass
class CycleStats:
    """Self-telemetry of the loop, read by metrics and the API."""

    cycles: int = 0
    overruns: int = 0
    skipped_ticks: int = 0
    late_starts: int = 0  # ticks that began more than a period after their deadline
    max_late_s: float = 0.0
    last_late_s: float = 0.0
    last_duration_s: float = 0.0
    max_duration_s: float = 0.0
    last_cpu_s: float = 0.0  # the last cycle's CPU time on the loop's thread
    durations_s: list[float] = field(default_factory=list)
    keep: int = 1000

    def record(self, duration_s: float, cpu_s: float = 0.0) -> None:
        self.cycles += 1
        self.last_duration_s = duration_s
        self.last_cpu_s = cpu_s
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
    on_overrun: Callable[[OverrunKind], None] | None = None,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> None:
    """Call ``body(now_s)`` every ``period_s`` on a monotonic deadline until ``stop`` is set.

    An exception in one cycle is logged and counted as an overrun; the loop goes on,
    because a controller that stops cycling leaves the racks to the agents' failsafe.
    Each overrun is also handed to ``on_overrun`` (the service counts it in metrics).
    ``cpu_clock`` measures the body's CPU time (the body runs on this thread: it awaits
    nothing that runs elsewhere), recorded as ``stats.last_cpu_s``.
    """

    def overrun(kind: OverrunKind) -> None:
        stats.overruns += 1
        if on_overrun is not None:
            on_overrun(kind)

    deadline = clock()
    while not stop.is_set():
        started = clock()
        late = max(0.0, started - deadline)
        stats.last_late_s = late
        if late > period_s:
            stats.late_starts += 1
            stats.max_late_s = max(stats.max_late_s, late)
            overrun("late")
            log.warning(
                "cycle started %.3f s after its deadline (period %.3f s): the event loop was"
                " blocked",
                late,
                period_s,
            )
        cpu_started = cpu_clock()
        try:
            await body(started)
        except Exception:
            log.exception("control cycle failed; continuing with the next one")
            overrun("failed")
        duration = clock() - started
        stats.record(duration, cpu_clock() - cpu_started)
        if duration > period_s:
            overrun("long")
            log.warning("cycle took %.3f s, longer than its period %.3f s", duration, period_s)
        deadline, skipped = next_deadline(deadline, period_s, clock())
        stats.skipped_ticks += skipped
        await wait(stop, max(0.0, deadline - clock()))
