"""F1: a tick that starts late because the event loop was blocked is an overrun.

The audit's 63 MB POST held the daemon's one event loop for 3 s: no cycle ran, all
agents were flagged lost, and ``overruns`` stayed 0 because only a cycle's own duration
was compared with its period. The first test is exact (a virtual clock); the second
blocks a real loop, and asserts counts only, never durations.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.core.cycle import CycleStats, run_cycle


async def test_f1_a_tick_started_periods_late_is_an_overrun() -> None:
    t = [0.0]
    waits = [0]
    calls: list[float] = []
    overruns: list[str] = []
    stop = asyncio.Event()

    async def body(now: float) -> None:
        calls.append(now)
        t[0] += 0.01  # every body is quick: only the wait runs long
        if len(calls) == 6:
            stop.set()

    async def wait(stop: asyncio.Event, delay_s: float) -> None:
        waits[0] += 1
        t[0] += delay_s + (1.5 if waits[0] == 2 else 0.0)  # the loop held for 3 periods
        await asyncio.sleep(0)

    stats = CycleStats()
    await run_cycle(
        body, 0.5, stats, stop, clock=lambda: t[0], wait=wait, on_overrun=overruns.append
    )
    assert stats.overruns == 1
    assert overruns == ["late"]
    assert stats.late_starts == 1 and stats.max_late_s == pytest.approx(1.5)
    assert stats.cycles == 6


async def test_f1_a_blocked_event_loop_is_counted() -> None:
    stop = asyncio.Event()
    n = [0]

    async def body(now: float) -> None:
        n[0] += 1
        if n[0] == 5:
            stop.set()

    async def hog() -> None:
        while n[0] < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a handler that holds the loop

    stats = CycleStats()
    hogging = asyncio.create_task(hog())
    await asyncio.wait_for(run_cycle(body, 0.05, stats, stop), 30)
    await hogging
    assert stats.late_starts >= 1
    assert stats.overruns >= stats.late_starts
