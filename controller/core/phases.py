"""Time and isolate the phases of a control cycle.

Why: a cycle is read -> decide -> act -> lease -> publish, and only the lease keeps GPUs
inside their envelope. An exception in an audit write, a scheduler hook or a publisher
used to skip that cycle's leases; now each phase runs under :meth:`PhaseRunner.run`, which
times it (``rackpower_cycle_phase_seconds{phase}``), and on failure counts it
(``rackpower_cycle_phase_failures_total{phase}``), logs it (the first failure of a phase
with its traceback at once, then one summary per ``summary_every_s`` while it keeps
failing: a phase failing every 0.5 s must not flood the journal) and lets the cycle go on.
What the cycle does after a failed phase is the caller's decision (controller.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("controller.cycle")

SUMMARY_EVERY_S = 60.0


class PhaseSink(Protocol):
    """Where phase timings and failures go (the controller's Metrics has both)."""

    def observe_phase(self, phase: str, duration_s: float) -> None: ...

    def count_phase_failure(self, phase: str) -> None: ...


@dataclass
class _Tally:
    count: int = 0
    since_log: int = 0
    last_log_s: float = float("-inf")


class PhaseRunner:
    """Runs named phases timed and isolated; remembers which failed in the current cycle."""

    def __init__(
        self,
        sink: PhaseSink,
        *,
        clock: Callable[[], float] = time.perf_counter,
        summary_every_s: float = SUMMARY_EVERY_S,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._every_s = summary_every_s
        self._tally: dict[str, _Tally] = {}
        self.failed: list[str] = []

    def start_cycle(self) -> None:
        self.failed = []

    @contextmanager
    def run(self, phase: str, what: str | None = None) -> Iterator[None]:
        """Time ``phase``; an exception in it is counted, logged and swallowed.

        ``what`` names a part of a phase (an integration): its failure counts for the
        phase, the log line names the part."""
        t0 = self._clock()
        try:
            yield
        except Exception as exc:  # isolation is the point: any failure, never the cycle
            self.fail(phase, exc, what)
        finally:
            if what is None:
                self._sink.observe_phase(phase, self._clock() - t0)

    def fail(self, phase: str, exc: BaseException, what: str | None = None) -> None:
        """Count and (rate-limited) log one failure of ``phase``."""
        if phase not in self.failed:
            self.failed.append(phase)
        self._sink.count_phase_failure(phase)
        key = f"{phase}:{what}" if what else phase
        tally = self._tally.setdefault(key, _Tally())
        tally.count += 1
        tally.since_log += 1
        now = time.monotonic()
        if tally.count == 1:
            log.error("cycle phase %s failed: %s", key, exc, exc_info=exc)
        elif now - tally.last_log_s >= self._every_s:
            log.error(
                "cycle phase %s failed %d times in the last %.0f s (%d in all; last: %s)",
                key,
                tally.since_log,
                self._every_s,
                tally.count,
                exc,
            )
        else:
            return
        tally.since_log = 0
        tally.last_log_s = now
