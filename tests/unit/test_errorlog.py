"""The rate-limited per-device error log (drivers/errorlog.py), on a fake clock.

A fake clock only: the behaviour under test is what happens over minutes of errors.
"""

from __future__ import annotations

import logging

import pytest

from drivers.errorlog import MAX_MESSAGE_CHARS, ErrorTally
from tests.helpers.clock import ManualClock


def test_n_errors_give_one_line_then_a_summary_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.errors")
    clock = ManualClock()
    tally = ErrorTally("pdu-7", summary_every_s=60.0, clock=clock)
    n = 3_000  # ten polls a second for five minutes
    for _ in range(n):
        tally.note("malformed", "x" * 10_000)
        clock.now_s += 0.1
    assert tally.counts == {"malformed": n}
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= len(lines) <= 1 + n * 0.1 / 60 + 1  # the first, then one per minute
    assert "malformed error" in lines[0]
    assert "600 errors of kind malformed in the last 60 s" in lines[1]
    assert all(len(line) < MAX_MESSAGE_CHARS + 150 for line in lines)  # text clipped


def test_each_kind_has_its_own_first_line_and_late_errors_are_summed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.errors")
    clock = ManualClock()
    tally = ErrorTally("d", summary_every_s=60.0, clock=clock)
    tally.note("timeout", "t")
    tally.note("malformed", "m")
    tally.note("timeout", "t")  # counted, not logged
    assert len(caplog.records) == 2
    clock.now_s = 500.0  # the one not logged is told with the next, however late
    tally.note("timeout", "t")
    assert "2 errors of kind timeout in the last 500 s" in caplog.records[-1].getMessage()
    clock.now_s = 1000.0  # a quiet spell with nothing pending: a first line again
    tally.note("timeout", "t")
    assert caplog.records[-1].getMessage() == "device d: timeout error: t"
    assert len(caplog.records) == 4
    assert tally.counts == {"timeout": 4, "malformed": 1}
