"""Fixed-deadline cycle: catches no stale ticks, counts overruns, survives a failing body."""

from __future__ import annotations

import asyncio

import pytest

from controller.core.cycle import CycleStats, next_deadline, run_cycle


@pytest.mark.parametrize(
    ("deadline", "period", "now", "expected", "skipped"),
    [
        (0.0, 0.5, 0.1, 0.5, 0),  # on time
        (0.0, 0.5, 0.5, 1.0, 1),  # exactly at the next tick: it is gone, take the one after
        (0.0, 0.5, 1.7, 2.0, 3),  # a long stall: skip 0.5, 1.0, 1.5
        (10.0, 1.0, 10.99, 11.0, 0),
    ],
)
def test_next_deadline(
    deadline: float, period: float, now: float, expected: float, skipped: int
) -> None:
    assert next_deadline(deadline, period, now) == pytest.approx((expected, skipped))


def test_percentile() -> None:
    s = CycleStats()
    for d in range(1, 101):
        s.record(d / 1000)
    assert s.percentile_s(0.99) == pytest.approx(0.099)
    assert s.percentile_s(0.5) == pytest.approx(0.050)
    assert s.max_duration_s == pytest.approx(0.1)


async def test_loop_runs_on_a_virtual_clock_and_counts_overruns() -> None:
    """A fake clock makes the timing exact: body 1 overruns by 2.5 periods."""
    t = [0.0]
    calls: list[float] = []
    stop = asyncio.Event()

    async def body(now: float) -> None:
        calls.append(now)
        t[0] += 1.3 if len(calls) == 2 else 0.1
        if len(calls) == 5:
            stop.set()

    stats = CycleStats()

    async def sleep_on_fake_clock(stop: asyncio.Event, delay_s: float) -> None:
        t[0] += delay_s
        await asyncio.sleep(0)

    await run_cycle(body, 0.5, stats, stop, clock=lambda: t[0], wait=sleep_on_fake_clock)
    assert calls[:3] == pytest.approx([0.0, 0.5, 2.0])  # 1.0 and 1.5 were skipped
    assert stats.overruns == 1 and stats.skipped_ticks == 2 and stats.cycles == 5


async def test_failing_body_does_not_stop_the_loop() -> None:
    stop = asyncio.Event()
    n = [0]

    async def body(now: float) -> None:
        n[0] += 1
        if n[0] == 3:
            stop.set()
        raise RuntimeError("boom")

    stats = CycleStats()
    await run_cycle(body, 0.001, stats, stop)
    assert n[0] == 3 and stats.overruns >= 3
