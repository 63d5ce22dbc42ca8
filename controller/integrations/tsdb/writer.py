"""Telemetry to an InfluxDB 2.x compatible TSDB, off the control path.

The control cycle must never wait for a database. So :meth:`TsdbWriter.submit` only
appends to a bounded in-memory queue; a background task cuts the queue into batches and
writes them with influxdb-client's synchronous ``WriteApi`` on a dedicated worker thread
(the async client would pull in aiohttp, which the project does not otherwise need).
When the TSDB is down the queue keeps the newest ``max_buffered_points`` and drops the
oldest, counting every drop: an engineer looking at a gap must be able to tell "the
controller was not running" from "the database was not reachable".

The schema (documented in ``docs/tsdb-schema.md``) is built here by small typed builders,
so the daemon never writes line protocol by hand and every field is a float: InfluxDB
rejects a whole batch when one field changes type (``3i`` then ``3.5``), so ints are
coerced once, at construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import urllib.parse
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point as _InfluxPoint
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from controller.model.config import InfluxConfig
from controller.model.secrets import read_secret, redact_text, redact_url

log = logging.getLogger(__name__)

# influxdb-client's Point is unannotated; it is used only to serialise (it owns escaping
# and number formatting), so it is called through Any rather than ignored line by line.
InfluxPoint: Any = _InfluxPoint

# ---------------------------------------------------------------------------
# Schema: measurements and their builders

M_NODE = "rackpower_node"
M_GPU = "rackpower_gpu"
M_JOB = "rackpower_job"
M_DEVICE = "rackpower_device"
M_CYCLE = "rackpower_cycle"
M_ACTIONS = "rackpower_actions"
M_TSDB = "rackpower_tsdb"


@dataclass(frozen=True)
class Point:
    """One TSDB point: ids as tags, numbers as fields, a wall-clock timestamp in ns.

    Non-finite field values (a NaN from a silent meter) are left out rather than refused:
    line protocol cannot carry them and one bad line would make the server reject the
    whole batch. A point left with no fields is counted and skipped by the writer.
    Tags with an empty value are left out too (line protocol has no empty tag value).
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, float]
    ts_ns: int

    def __post_init__(self) -> None:
        if not isinstance(self.measurement, str) or not self.measurement:
            raise ValueError(f"measurement must be a non-empty string, got {self.measurement!r}")
        if isinstance(self.ts_ns, bool) or not isinstance(self.ts_ns, int):
            raise TypeError(f"ts_ns must be an int (ns since the epoch), got {self.ts_ns!r}")
        tags: dict[str, str] = {}
        for key, value in self.tags.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise TypeError(f"tag {key!r}={value!r}: tags are non-empty str keys, str values")
            if value:
                tags[key] = value
        fields: dict[str, float] = {}
        for key, number in self.fields.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"field name must be a non-empty str, got {key!r}")
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise TypeError(f"field {key!r} must be a number, got {number!r}")
            if math.isfinite(number):
                fields[key] = float(number)
        # Read-only views: a frozen snapshot must not change under the writer's thread.
        object.__setattr__(self, "tags", MappingProxyType(tags))
        object.__setattr__(self, "fields", MappingProxyType(fields))

    def to_line(self) -> str:
        """Line protocol via influxdb-client, which owns the escaping rules."""
        p = InfluxPoint(self.measurement)
        for key, value in self.tags.items():
            p.tag(key, value)
        for key, number in self.fields.items():
            p.field(key, number)
        p.time(self.ts_ns)  # default precision: ns
        line: str = p.to_line_protocol()
        return line


def _opt(fields: dict[str, float | None]) -> dict[str, float]:
    return {k: v for k, v in fields.items() if v is not None}


def node_point(
    site: str,
    node: str,
    kind: str,
    *,
    power_w: float,
    envelope_w: float,
    headroom_w: float | None,
    ts_ns: int,
    estimated_w: float | None = None,
    reserved_w: float | None = None,
    cap_w: float | None = None,
    capped_gpus: int | None = None,
    over_envelope: bool | None = None,
    violations: int | None = None,
) -> Point:
    """A power-tree node (feed, sst, bus, row, rack, node) in one cycle.

    ``cap_w`` is the sum of the GPU limits the policy sets below the node, ``violations`` a
    counter of cycles spent above the envelope since the controller started. A GPU server
    has no headroom of its own (the policy keeps none for it): ``headroom_w=None``.
    """
    return Point(
        M_NODE,
        {"site": site, "node": node, "kind": kind},
        _opt(
            {
                "power_w": power_w,
                "envelope_w": envelope_w,
                "headroom_w": headroom_w,
                "estimated_w": estimated_w,
                "reserved_w": reserved_w,
                "cap_w": cap_w,
                "capped_gpus": None if capped_gpus is None else float(capped_gpus),
                "over_envelope": None if over_envelope is None else float(over_envelope),
                "violations": None if violations is None else float(violations),
            }
        ),
        ts_ns,
    )


def gpu_point(
    site: str,
    node: str,
    gpu: int,
    *,
    power_w: float,
    limit_w: float,
    ts_ns: int,
    job: str | None = None,
    target_w: float | None = None,
) -> Point:
    """One GPU: measured power, the NVML power limit in force, the limit the policy sets.

    A NaN power or limit (the agent is silent) is left out; ``target_w`` beside
    ``limit_w`` shows a node that does not apply its lease.
    """
    tags = {"site": site, "node": node, "gpu": str(gpu)}
    if job:
        tags["job"] = job
    return Point(
        M_GPU, tags, _opt({"power_w": power_w, "limit_w": limit_w, "target_w": target_w}), ts_ns
    )


def job_point(
    site: str,
    job: str,
    *,
    cap_w: float,
    gpus: int,
    ts_ns: int,
    priority: str | None = None,
    power_w: float | None = None,
) -> Point:
    """A job's cap: one per-GPU limit for the whole job, since caps are per job."""
    tags = {"site": site, "job": job}
    if priority:
        tags["priority"] = priority
    return Point(
        M_JOB, tags, _opt({"cap_w": cap_w, "gpus": float(gpus), "power_w": power_w}), ts_ns
    )


def device_point(
    site: str,
    device: str,
    driver: str,
    *,
    poll_duration_s: float | None,
    errors: int | None,
    retries: int | None,
    ts_ns: int,
    stale: bool | None = None,
) -> Point:
    """A driver's own health: last poll time and cumulative error/retry counters.

    An agent is not polled: it has only ``stale`` (``None`` for the others).
    """
    return Point(
        M_DEVICE,
        {"site": site, "device": device, "driver": driver},
        _opt(
            {
                "poll_duration_s": poll_duration_s,
                "errors": None if errors is None else float(errors),
                "retries": None if retries is None else float(retries),
                "stale": None if stale is None else float(stale),
            }
        ),
        ts_ns,
    )


def cycle_point(
    site: str,
    *,
    duration_s: float,
    overruns: int,
    ts_ns: int,
    mode: str | None = None,
    period_s: float | None = None,
) -> Point:
    """One control cycle: how long it took and the cumulative overrun count."""
    tags = {"site": site}
    if mode:
        tags["mode"] = mode
    return Point(
        M_CYCLE,
        tags,
        _opt({"duration_s": duration_s, "overruns": float(overruns), "period_s": period_s}),
        ts_ns,
    )


def actions_point(site: str, action: str, *, count: int, ts_ns: int) -> Point:
    """Cumulative count of one kind of action (cap, uncap, migrate, requeue, refuse)."""
    return Point(M_ACTIONS, {"site": site, "action": action}, {"count": float(count)}, ts_ns)


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
