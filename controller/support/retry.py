"""Keep a long-running task alive: its failure is logged, backed off and never fatal.

Why: an integration (a broker, a scheduler, the TSDB) that dies must not end the service,
and one that keeps dying must not spin; only the control cycle's own death ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("controller.service")


async def retry_forever(name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    """Run ``run`` until ``stop``; restart it with backoff (1 s doubling to 60 s) on failure."""
    delay = 1.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            await run()
            if stop.is_set():
                return
            log.warning("%s returned; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s failed: %s; retrying in %.0f s", name, exc, delay)
        if time.monotonic() - started > 60:
            delay = 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, 60.0)
