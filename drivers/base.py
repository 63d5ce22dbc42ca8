"""What every driver shares: capability protocols, self-telemetry and the per-device poll loop.

The controller never waits on a bus: each device gets its own asyncio task that reads it
every ``period_s``, bounds each read by ``timeout_s`` (shorter than the period), and hands
the readings to a sink (the readings store). A device that times out, refuses, vanishes or
answers garbage only affects its own task: its points go ERROR/BAD, its error counters
rise, reconnects back off exponentially with jitter (so a hundred shelves behind one
rebooted gateway do not reconnect in lockstep), and every other device keeps its schedule.

Drivers import nothing from ``controller``: the controller turns its ``DeviceSpec`` into a
:class:`DeviceParams` and picks the driver from :data:`DRIVER_TYPES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from drivers.errorlog import ErrorTally, clip
from drivers.reading import Quality, Reading

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Errors: the poll loop treats them differently, so their kind matters.


# ``kind`` is what the per-device error counts and ``rackpower_device_errors_total`` are
# keyed by: a short, closed set of names, never a device's own text (see drivers.errorlog).


class DriverError(Exception):
    """The device as a whole could not be read this time (all its points go ERROR)."""

    kind = "error"


class DeviceTimeout(DriverError):
    """No answer within the timeout. Repeated timeouts back off, to spare shared links."""

    kind = "timeout"


class DeviceUnreachable(DriverError):
    """No connection (refused, lost, TLS failure). The loop reconnects with backoff."""

    kind = "unreachable"


class MalformedResponse(DriverError):
    """The device answered, but not with a valid reply to what we asked: garbage, a
    truncated or oversized frame, another request's id, the wrong function or count."""

    kind = "malformed"


class WriteRejected(DriverError):
    """A write refused before it reached the bus: unknown, read-only or out-of-range point."""

    kind = "rejected"


# Kinds the poll loop itself gives (besides the DriverError kinds above).
KIND_BAD_VALUE = "bad_value"  # the device answered, but some points are garbage (BAD)
KIND_DRIVER_BUG = "driver_bug"  # an exception no driver should raise: a bug, isolated


# ---------------------------------------------------------------------------
# Capabilities: small protocols, so a caller asks for what it needs, not for a base class.


@dataclass(frozen=True, slots=True)
class PointKey:
    """A point a pollable reports: used to mark it ERROR when the whole read fails."""

    device: str
    point: str
    unit: str


@runtime_checkable
class Pollable(Protocol):
    """Something the poll loop can drive: connect, read everything, close.

    The loop bounds ``read()`` by the device's ``timeout_s``. A pollable that shares a link
    with others (units behind one Modbus gateway) sets ``times_itself = True`` and bounds
    only its own time on the wire by ``timeout_s``: waiting for the link while a neighbour
    is being read must not count as this device timing out. The loop then bounds the read
    by the period.
    """

    @property
    def name(self) -> str: ...

    def point_keys(self) -> Sequence[PointKey]: ...

    async def connect(self) -> None: ...

    async def read(self) -> Sequence[Reading]: ...

    async def close(self) -> None: ...


@runtime_checkable
class PointReader(Protocol):
    async def read_point(self, point: str) -> Reading: ...


@runtime_checkable
class PowerReader(Protocol):
    """A meter: the power the device measures (its map's ``power_point``)."""

    async def read_power_w(self) -> Reading: ...


@runtime_checkable
class PointWriter(Protocol):
    """Writes a setpoint; raises WriteRejected unless the map marks it writable and in range."""

    async def write_point(self, point: str, value: float) -> None: ...


@runtime_checkable
class PowerLimiter(Protocol):
    async def set_power_limit_w(self, limit_w: float) -> None: ...


# ---------------------------------------------------------------------------
# Parameters: the driver-side twin of controller.model.config.DeviceSpec.


@dataclass(frozen=True)
class DeviceParams:
    """How to reach and poll one device. The controller fills it from its DeviceSpec.

    Only what every polled driver has: where, which map, how often. Everything
    protocol-specific (Modbus ``unit_id``, ``tls``, ``retries``...; SNMP ``community``,
    ``snmp_version``, the v3 user and keys...) is in ``options``, and each driver decodes
    its own (``ModbusOptions``, ``SnmpOptions``), so a new protocol or knob never changes
    this contract.
    """

    device_id: str
    driver: str
    host: str = "127.0.0.1"
    port: int | None = None
    map_name: str | None = None
    period_s: float = 1.0
    timeout_s: float = 0.5
    stale_s: float = 3.0
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < self.period_s:
            raise ValueError(
                f"{self.device_id}: timeout_s {self.timeout_s:g} must be >0 and shorter "
                f"than period_s {self.period_s:g}"
            )


def int_option(params: DeviceParams, key: str, default: int) -> int:
    """An integer option; a wrong type is a start-up error naming the device, not a guess."""
    value = params.options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{params.device_id}: option {key} must be an integer, got {value!r}")
    return value


def str_option(params: DeviceParams, key: str) -> str | None:
    """A text option, or None when it is not given."""
    value = params.options.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{params.device_id}: option {key} must be text, got {value!r}")
    return value


def bool_option(params: DeviceParams, key: str, default: bool) -> bool:
    value = params.options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{params.device_id}: option {key} must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------------------
# Readings helpers


def now_pair() -> tuple[float, float]:
    return time.monotonic(), time.time()


def failed_readings(
    keys: Sequence[PointKey],
    message: str,
    quality: Quality = Quality.ERROR,
    at: tuple[float, float] | None = None,
) -> list[Reading]:
    """NaN readings for every key, saying why: what a store gets when a whole read fails."""
    ts, wall = at or now_pair()
    return [Reading(k.device, k.point, math.nan, k.unit, ts, wall, quality, message) for k in keys]


# ---------------------------------------------------------------------------
# Self-telemetry


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Per-device health for /metrics and the API; a snapshot, replaced after each poll."""

    device: str
    polls: int = 0
    errors: int = 0  # failed polls plus points that came back ERROR or BAD
    timeouts: int = 0
    retries: int = 0  # protocol-level re-sends reported by the driver
    reconnects: int = 0
    consecutive_failures: int = 0
    overruns: int = 0  # polls that took longer than the period
    last_poll_duration_s: float | None = None
    max_poll_duration_s: float = 0.0
    last_good_s: float | None = None  # monotonic time of the last poll with a GOOD point
    last_error: str | None = None
    connected: bool = False


Sink = Callable[[Sequence[Reading]], None]


class Backoff:
    """Exponential delay with jitter: d = min(max, initial * 2**n) * U(1 - jitter, 1)."""

    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        base = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return base * self._rng.uniform(1.0 - self.jitter, 1.0)

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class PollSettings:
    period_s: float
    timeout_s: float
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Consecutive timeouts before polls are spaced out by the backoff instead of the period.
    timeouts_before_backoff: int = 2

    @classmethod
    def from_params(cls, p: DeviceParams) -> PollSettings:
        return cls(period_s=p.period_s, timeout_s=p.timeout_s)


class DevicePoller:
    """The loop of one pollable. Never raises out of :meth:`run` except on cancellation."""

    def __init__(
        self,
        target: Pollable,
        settings: PollSettings,
        sink: Sink,
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self.settings = settings
        self.sink = sink
        self.stats = DeviceStats(device=target.name)
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, rng=rng)
        self._connected = False
        # Errors by kind, and the rate-limited log of them (one line per kind per minute).
        self.errors = ErrorTally(target.name)
        # Python 3.11's wait_for (used inside pymodbus) can swallow a cancellation that
        # races with a reply, so stopping is also a flag the loop checks.
        self.stopping = False

    def _emit(self, readings: Sequence[Reading]) -> None:
        try:
            self.sink(readings)
        except Exception:  # a broken sink must not stop polling
            log.exception("sink failed for %s", self.target.name)

    def _fail(self, message: str, kind: str, *, timeout: bool = False) -> None:
        message = clip(message)
        self.errors.note(kind, message)
        s = self.stats
        self.stats = replace(
            s,
            errors=s.errors + 1,
            timeouts=s.timeouts + (1 if timeout else 0),
            consecutive_failures=s.consecutive_failures + 1,
            last_error=message,
            connected=self._connected,
        )
        self._emit(failed_readings(self.target.point_keys(), message))

    async def _connect(self) -> bool:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await self.target.connect()
        except (DriverError, OSError, TimeoutError) as e:
            self._connected = False
            timeout = isinstance(e, TimeoutError)
            self._fail(f"connect failed: {_describe(e)}", _kind(e, "unreachable"), timeout=timeout)
            return False
        self._connected = True
        self.stats = replace(self.stats, reconnects=self.stats.reconnects + 1, connected=True)
        return True

    async def poll_once(self) -> float | None:
        """One attempt; returns a delay (s) to wait instead of the period, or None."""
        if not self._connected and not await self._connect():
            return self._backoff.next_delay_s()
        start = time.monotonic()
        times_itself = bool(getattr(self.target, "times_itself", False))
        limit_s = self.settings.period_s if times_itself else self.settings.timeout_s
        try:
            async with asyncio.timeout(limit_s):
                readings = await self.target.read()
        except (TimeoutError, DeviceTimeout) as e:
            self._record_duration(start)
            self._fail(
                f"timeout after {self.settings.timeout_s:g} s: {_describe(e)}",
                "timeout",
                timeout=True,
            )
            if self.stats.consecutive_failures >= self.settings.timeouts_before_backoff:
                return self._backoff.next_delay_s()
            return None
        except (DeviceUnreachable, OSError) as e:
            self._record_duration(start)
            self._connected = False
            with contextlib.suppress(Exception):
                await self.target.close()
            self._fail(f"connection lost: {_describe(e)}", "unreachable")
            return self._backoff.next_delay_s()
        except DriverError as e:
            self._record_duration(start)
            self._fail(_describe(e), e.kind)
            return None
        except Exception as e:  # a driver bug: isolate it to this device, keep the loop
            self._record_duration(start)
            if KIND_DRIVER_BUG not in self.errors.counts:  # the traceback once, then counts
                log.exception("driver bug while polling %s", self.target.name)
            self._fail(f"driver error: {_describe(e)}", KIND_DRIVER_BUG)
            return None
        self._record_duration(start)
        self._backoff.reset()
        good = any(r.quality is Quality.GOOD for r in readings)
        bad = sum(1 for r in readings if r.quality is not Quality.GOOD)
        first_problem = next((r.error for r in readings if r.error), None)
        if bad:
            self.errors.note(KIND_BAD_VALUE, first_problem or "a point came back BAD")
        s = self.stats
        self.stats = replace(
            s,
            errors=s.errors + bad,
            consecutive_failures=0 if good else s.consecutive_failures + 1,
            last_good_s=readings[0].ts_s if good and readings else s.last_good_s,
            last_error=clip(first_problem) if bad and first_problem else s.last_error,
            connected=True,
            retries=s.retries + int(getattr(self.target, "last_retries", 0) or 0),
        )
        self._emit(readings)
        return None

    def _record_duration(self, start: float) -> None:
        d = time.monotonic() - start
        s = self.stats
        self.stats = replace(
            s,
            polls=s.polls + 1,
            last_poll_duration_s=d,
            max_poll_duration_s=max(s.max_poll_duration_s, d),
            overruns=s.overruns + (1 if d > self.settings.period_s else 0),
        )

    async def run(self) -> None:
        """Poll on a monotonic grid (next += period), skipping ticks that were missed."""
        period = self.settings.period_s
        next_s = time.monotonic()
        try:
            while not self.stopping:
                delay = await self.poll_once()
                now = time.monotonic()
                next_s += period
                if next_s <= now:  # overran: skip the missed ticks, stay on the grid
                    next_s += math.ceil((now - next_s) / period) * period
                if delay is not None and now + delay > next_s:
                    next_s += math.ceil((now + delay - next_s) / period) * period
                await asyncio.sleep(max(0.0, next_s - time.monotonic()))
        finally:
            with contextlib.suppress(Exception):
                await self.target.close()
            self._connected = False


def _describe(e: BaseException) -> str:
    text = clip(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _kind(e: BaseException, default: str) -> str:
    if isinstance(e, DriverError) and type(e) is not DriverError:
        return e.kind
    return "timeout" if isinstance(e, TimeoutError) else default


class PollGroup:
    """Owns one poll task per device. ``async with PollGroup(sink) as g: g.add(...)``."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pollers: dict[str, DevicePoller] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def add(self, target: Pollable, settings: PollSettings) -> DevicePoller:
        if target.name in self.pollers:
            raise ValueError(f"device {target.name!r} is already polled")
        poller = DevicePoller(target, settings, self.sink)
        self.pollers[target.name] = poller
        self._tasks[target.name] = asyncio.get_running_loop().create_task(
            poller.run(), name=f"poll:{target.name}"
        )
        return poller

    def stats(self) -> dict[str, DeviceStats]:
        return {name: p.stats for name, p in self.pollers.items()}

    def error_counts(self) -> dict[tuple[str, str], int]:
        """``{(device, kind): errors since start}`` for ``rackpower_device_errors_total``."""
        return {
            (name, kind): n
            for name, p in self.pollers.items()
            for kind, n in p.errors.counts.items()
        }

    async def remove(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        poller = self.pollers.pop(name, None)
        if poller is not None:
            poller.stopping = True
        if task is not None:
            while not task.done():  # re-cancel: one cancellation may be swallowed (see above)
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        for name in list(self._tasks):
            await self.remove(name)

    async def __aenter__(self) -> PollGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
