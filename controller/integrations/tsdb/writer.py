"""Telemetry to an InfluxDB 2.x compatible TSDB, off the control path.

The control cycle must never wait for a database. So :meth:`TsdbWriter.submit` only
appends to a bounded in-memory queue; a background task cuts the queue into batches and
writes them with influxdb-client's synchronous ``WriteApi`` on a dedicated worker thread
(the async client would pull in aiohttp, which the project does not otherwise need).
When the TSDB is down the queue keeps the newest ``max_buffered_points`` and drops the
oldest, counting every drop: an engineer looking at a gap must be able to tell "the
controller was not running" from "the database was not reachable".

The schema (documented in ``docs/tsdb-schema.md``) and its typed builders are the core's,
in :mod:`controller.core.points`; this module only queues and writes what it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import urllib.parse
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from controller.core.points import M_TSDB, Point
from controller.model.config import InfluxConfig
from controller.model.secrets import read_secret, redact_text, redact_url

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# The writer's own point


def tsdb_point(site: str, stats: TsdbStats, *, ts_ns: int) -> Point:
    """The writer's own counters, so dropped telemetry shows up in the telemetry."""
    return Point(
        M_TSDB,
        {"site": site},
        {
            "written": float(stats.written_points),
            "dropped": float(stats.dropped_points),
            "rejected": float(stats.rejected_points),
            "skipped": float(stats.skipped_points),
            "failed_batches": float(stats.failed_batches),
            "queue_depth": float(stats.queue_depth),
        },
        ts_ns,
    )


# ---------------------------------------------------------------------------
# Writer


def _secrets_in(url: str) -> tuple[str, ...]:
    """The userinfo of a URL and its password, longest first, to scrub from error text."""
    userinfo = urllib.parse.urlsplit(url).netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return tuple(x for x in (userinfo, password) if x)


def resolve_token(cfg: InfluxConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API token from the environment or a file; ``None`` when neither is configured.

    A configured source that is missing is an error at startup, not a silent
    unauthenticated writer that fails every batch later.
    """
    return read_secret("influx token", cfg.token_env, cfg.token_file, environ)


@dataclass(frozen=True)
class TsdbStats:
    """Counters since start (monotonic) plus the current queue depth and last error."""

    written_points: int
    dropped_points: int
    rejected_points: int
    skipped_points: int
    failed_batches: int
    queue_depth: int
    last_error: str | None


class _Outcome(Enum):
    WRITTEN = "written"
    REJECTED = "rejected"  # the server refused the data itself: retrying cannot help
    FAILED = "failed"  # the server was not reachable or not healthy: retry later


_REFUSED_STATUS = frozenset({400, 413, 422})


class TsdbWriter:
    """Batches points to ``/api/v2/write``; ``submit`` never blocks and never raises.

    Use ``async with TsdbWriter(cfg) as w:`` or ``start()`` / ``await aclose()``. All
    methods must be called from the event loop's thread.
    """

    def __init__(
        self,
        cfg: InfluxConfig,
        *,
        timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        close_deadline_s: float = 5.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._shown_url = redact_url(cfg.url)  # F10: what logs may show of the URL
        self.timeout_s = timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.close_deadline_s = close_deadline_s
        self._url_secrets = _secrets_in(cfg.url)
        token = resolve_token(cfg, environ)
        self._client = InfluxDBClient(
            # An empty token sends no Authorization header (InfluxDB without auth, VM).
            url=cfg.url,
            token=token or "",
            org=cfg.org,
            timeout=int(timeout_s * 1000),
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        # One thread: batches go out in order and the client is never shared across threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsdb-writer")
        # Queue with sequence numbers: item i of the deque has sequence head_seq + i. The
        # batch in flight stays in the deque until the server confirms it, so a failed
        # batch is retried first and "oldest" keeps its meaning.
        self._queue: deque[Point] = deque()
        self._head_seq = 0
        self._inflight: tuple[int, int] | None = None  # [start, end) sequence numbers
        self._inflight_trimmed = 0  # in-flight points pushed out while their write runs
        self._written = 0
        self._dropped = 0
        self._rejected = 0
        self._skipped = 0
        self._failed_batches = 0
        self._last_error: str | None = None
        self._healthy = True  # last write went through: log failures on change, not per try
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    # -- control path ------------------------------------------------------

    def submit(self, points: Iterable[Point]) -> None:
        """Queue points for writing; drops the oldest beyond the bound. O(points), no I/O."""
        try:
            for point in points:
                if not point.fields:
                    self._skipped += 1
                    continue
                if self._closed:
                    self._dropped += 1
                    continue
                self._queue.append(point)
        except Exception as e:  # the control cycle must not die of telemetry
            self._last_error = f"submit: {e!r}"
            log.exception("tsdb: submit failed")
        self._trim()
        if len(self._queue) >= self.cfg.batch_size:
            self._wake.set()

    def stats(self) -> TsdbStats:
        """A snapshot for /metrics and the API; queue_depth includes the batch in flight."""
        return TsdbStats(
            written_points=self._written,
            dropped_points=self._dropped,
            rejected_points=self._rejected,
            skipped_points=self._skipped,
            failed_batches=self._failed_batches,
            queue_depth=len(self._queue),
            last_error=self._last_error,
        )

    def _trim(self) -> None:
        excess = len(self._queue) - self.cfg.max_buffered_points
        for _ in range(max(0, excess)):
            self._queue.popleft()
            if self._inflight is not None and self._head_seq < self._inflight[1]:
                # Its write is under way: it is lost only if that write fails.
                self._inflight_trimmed += 1
            else:
                self._dropped += 1
            self._head_seq += 1

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher in the running loop (idempotent)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tsdb-writer")

    async def __aenter__(self) -> TsdbWriter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, deadline_s: float | None = None) -> None:
        """Flush what is buffered, giving up after the deadline; leftovers count as dropped."""
        if self._closed:
            return
        deadline = self.close_deadline_s if deadline_s is None else deadline_s
        self.start()  # points submitted before start still deserve a flush
        self._closing.set()
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=deadline)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:  # a bug in the flusher must not break the daemon's shutdown
                log.exception("tsdb: writer task failed")
        self._closed = True
        lost = len(self._queue) + self._inflight_trimmed
        if lost:
            self._dropped += lost
            log.warning("tsdb: %d points not written at shutdown", lost)
        self._queue.clear()
        self._inflight = None
        self._inflight_trimmed = 0
        # A write stuck in the thread finishes (or times out) on its own; close the client
        # after it instead of under it, and do not wait.
        self._executor.submit(self._client.close)
        self._executor.shutdown(wait=False)

    # -- background --------------------------------------------------------

    async def _run(self) -> None:
        backoff_s = self.backoff_initial_s
        retrying = False
        while True:
            if not (retrying or self._closing.is_set()) and len(self._queue) < self.cfg.batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.flush_s)
            self._wake.clear()
            if not self._queue:
                if self._closing.is_set():
                    return
                continue
            outcome = await self._send_batch()
            retrying = outcome is _Outcome.FAILED
            if not retrying:
                backoff_s = self.backoff_initial_s
                continue
            # Full jitter: many controllers coming back together should not stampede.
            delay_s = random.uniform(0.5, 1.0) * backoff_s
            backoff_s = min(backoff_s * 2, self.backoff_max_s)
            if self._closing.is_set():
                await asyncio.sleep(delay_s)
            else:
                with contextlib.suppress(TimeoutError):
                    # aclose() cuts the wait short for one last attempt.
                    await asyncio.wait_for(self._closing.wait(), timeout=delay_s)

    async def _send_batch(self) -> _Outcome:
        n = min(self.cfg.batch_size, len(self._queue))
        batch = [self._queue[i] for i in range(n)]
        start = self._head_seq
        self._inflight = (start, start + n)
        self._inflight_trimmed = 0
        loop = asyncio.get_running_loop()
        try:
            outcome, error = await loop.run_in_executor(self._executor, self._write, batch)
        finally:
            self._inflight = None
        for secret in self._url_secrets:  # an exception's text may quote the URL
            error = error.replace(secret, "***") if error else error
        trimmed, self._inflight_trimmed = self._inflight_trimmed, 0
        if outcome is _Outcome.FAILED:
            self._failed_batches += 1
            self._dropped += trimmed
            if self._healthy:
                log.warning("tsdb: write to %s failed, buffering: %s", self._shown_url, error)
            self._last_error = error
            self._healthy = False
            return outcome
        # Written or refused for good: either way these points leave the queue.
        while self._head_seq < start + n:
            self._queue.popleft()
            self._head_seq += 1
        if outcome is _Outcome.WRITTEN:
            self._written += n
            if not self._healthy:
                log.info("tsdb: writes to %s resumed", self._shown_url)
            self._healthy = True
        else:
            self._rejected += n
            self._failed_batches += 1
            self._last_error = error
            log.error("tsdb: %d points refused by %s: %s", n, self._shown_url, error)
        return outcome

    def _write(self, batch: list[Point]) -> tuple[_Outcome, str | None]:
        """Runs in the worker thread: serialise and POST one batch."""
        try:
            body = "\n".join(line for line in (p.to_line() for p in batch) if line)
            self._write_api.write(
                bucket=self.cfg.bucket,
                org=self.cfg.org,
                record=body,  # the write precision defaults to ns, as Point.ts_ns
            )
        except ApiException as e:
            status: Any = getattr(e, "status", None)
            error = f"HTTP {status}: {_short(getattr(e, 'body', None) or e.reason)}"
            # The data itself is wrong (bad line, too large, field type conflict): the same
            # batch would fail forever and hold up everything behind it. Auth, bucket and
            # server errors may be fixed while we wait, so those are retried.
            if status in _REFUSED_STATUS:
                return _Outcome.REJECTED, error
            return _Outcome.FAILED, error
        except Exception as e:  # connection refused, timeout, reset: the server is away
            return _Outcome.FAILED, _short(redact_text(repr(e)))
        return _Outcome.WRITTEN, None


def _short(text: object, limit: int = 300) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + "..."
