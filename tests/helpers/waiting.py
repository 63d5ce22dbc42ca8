"""Waiting for an outcome that has no event to await (a broker delivery, a write landing).

Poll a condition with a deadline that only bounds a hang: a healthy run returns at the first
poll that holds, so a generous timeout costs nothing and keeps a loaded 2-core CI green.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], bool | Awaitable[bool]]

WAIT_S = 15.0  # only a broken link ever waits this long
EVERY_S = 0.02


async def holds(check: Check) -> bool:
    """Evaluate ``check``, awaiting it when it is a coroutine function."""
    got = check()
    if inspect.isawaitable(got):
        got = await got
    return bool(got)


async def eventually(
    check: Check, what: str, timeout_s: float = WAIT_S, every_s: float = EVERY_S
) -> None:
    """Poll ``check`` (plain or async) until it holds; fail naming ``what`` when it never does."""
    deadline = time.monotonic() + timeout_s
    while not await holds(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(every_s)


async def until(cond: Check, timeout_s: float = 30.0, every_s: float = EVERY_S) -> bool:
    """Let the loop run until ``cond`` holds; return whether it did (the caller asserts)."""
    deadline = time.monotonic() + timeout_s
    while not await holds(cond):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True
