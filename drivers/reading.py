"""What every driver produces: a value with its unit, time and quality.

Lives in ``drivers`` because drivers import nothing from the controller; the controller's
readings store and the policy consume these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Quality(enum.Enum):
    """How far a reading may be trusted. Anything but GOOD counts as worst case."""

    GOOD = "good"
    STALE = "stale"  # older than the device's stale limit
    BAD = "bad"  # the device answered, but the value is garbage (NaN, out of range, wrong type)
    ERROR = "error"  # the device did not answer (timeout, exception response, gone)


@dataclass(frozen=True, slots=True)
class Reading:
    """One point of one device at one moment.

    ``ts_s`` is ``time.monotonic()`` when the value was read (ages are computed against
    the same clock); ``wall_ts_s`` is ``time.time()`` for publishing.
    """

    device: str
    point: str
    value: float
    unit: str
    ts_s: float
    wall_ts_s: float
    quality: Quality = Quality.GOOD
    error: str | None = None

    def age_s(self, now_s: float) -> float:
        return now_s - self.ts_s

    def usable(self, now_s: float, stale_s: float) -> bool:
        """Fresh and good: the only readings the policy takes at face value."""
        return self.quality is Quality.GOOD and now_s - self.ts_s <= stale_s
