"""A clock the test moves by hand: time passes only when the test says so.

Code under test takes its clock as a ``Callable[[], float]``; this is one, so a test of an
expiry or a rate limit sets ``now_s`` and reads the outcome, with no sleep and no flake.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ManualClock:
    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s
