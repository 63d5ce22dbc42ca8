"""Per-device error counts and a rate-limited log of them.

Why: a device that answers garbage fails every poll, several times a second, for as long
as nobody fixes it. Logging each failure floods the journal (and hides the one line about
the other devices that matters); logging none hides the fault. So each device counts its
errors by kind (``timeout``, ``unreachable``, ``malformed``, ``exception``, ``bad_value``,
``driver_bug``...), logs the *first* error of a kind at once, and after that one summary
per kind every ``summary_every_s`` while errors keep coming:

    device pdu-7: 1,234 errors of kind malformed in the last 60 s (last: ...)

The counts only grow (they back the ``rackpower_device_errors_total`` counter), and their
keys are a small closed set of kinds, never a message: a hostile device choosing its own
error text cannot grow the table or the metric's cardinality.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

# How long an error text may be where it is stored or logged: a hostile device must not
# make us keep (or print) a megabyte of its garbage in every reading.
MAX_MESSAGE_CHARS = 200

DEFAULT_SUMMARY_EVERY_S = 60.0

log = logging.getLogger("drivers.errors")


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more chars)"


class ErrorTally:
    """Counts one device's errors by kind and decides which of them are worth a log line.

    ``note`` is called once per error. The first error of a kind is logged (WARNING), the
    rest of that kind are only counted until ``summary_every_s`` has passed since that
    kind's last line; then the next error logs how many came meanwhile. A kind that stops
    failing stops logging; its next error after a quiet spell is logged as a first again.
    """

    def __init__(
        self,
        device: str,
        *,
        summary_every_s: float = DEFAULT_SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.device = device
        self.summary_every_s = summary_every_s
        self._clock = clock
        self._log = logger
        self.counts: dict[str, int] = {}  # kind -> errors since start (only grows)
        self._since_line: dict[str, int] = {}  # kind -> errors not yet in a log line
        self._line_at: dict[str, float] = {}  # kind -> when its last line went out
        self.lines = 0  # log lines written (for tests and self-telemetry)

    def note(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self._clock()
        last = self._line_at.get(kind)
        pending = self._since_line.get(kind, 0) + 1
        if last is None or (now - last >= 2 * self.summary_every_s and pending == 1):
            # First of its kind, or the first after a quiet spell: say it now.
            self._log.warning("device %s: %s error: %s", self.device, kind, clip(message))
        elif now - last >= self.summary_every_s:
            self._log.warning(
                "device %s: %s errors of kind %s in the last %.0f s (last: %s)",
                self.device,
                f"{pending:,}",
                kind,
                now - last,
                clip(message),
            )
        else:
            self._since_line[kind] = pending
            return
        self.lines += 1
        self._line_at[kind] = now
        self._since_line[kind] = 0

    def snapshot(self) -> Mapping[str, int]:
        return dict(self.counts)
