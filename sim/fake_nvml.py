"""A fake NVML for machines without a GPU: pynvml's interface, backed by the plant.

``FakeNvml`` is a drop-in backend for ``drivers.nvml.NvmlDriver`` (and anything else written
against ``pynvml``): the same function names and signatures, the same units (mW, mJ), the same
``c_nvmlFieldValue_t`` structs from field queries, and pynvml's own exception classes, so
``except pynvml.NVMLError_NoPermission`` behaves exactly as on a GPU node.

Power comes from a :class:`sim.values.PointSource` per GPU device id (``<node>-g<i>``, the
power tree's GPU ids): point ``power_w`` is the instantaneous draw; ``power_avg_w`` and
``energy_j`` are taken from the source when it has them, otherwise the fake derives the
1 s average and the energy counter from the power it sampled (piecewise constant between
samples: call :meth:`FakeNvml.tick` at the plant's step for exact figures).

Limits behave like NVML's: a set outside [min, max] is InvalidArgument, a set without root
(when ``require_root``) is NoPermission; an accepted set becomes the enforced limit after
``actuation_delay_s``, and is then written to the source as point ``limit_w`` for the plant.

A node whose tenant has root and raises the limit by hand: :meth:`FakeNvml.ignore_set_limit`
makes a GPU acknowledge every later set (success, as a shim or a ``nvidia-smi -pl`` loop
would leave it) while its enforced limit stays where the tenant put it. Its reads stay
honest (the agent reports the real power and limit); what the controller must not trust
is that a lease it sent was applied.

Faults: the shared :class:`sim.faults.FaultTable` per GPU device id (GONE: GpuIsLost on every
call; DELAY: the call blocks for ``delay_s``, as a slow NVML call does; TIMEOUT: Timeout;
EXCEPTION: Unknown; GARBAGE: all-ones power), plus NVML's own: the instantaneous field not
supported on a GPU, and the library missing at ``nvmlInit``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml

from sim.faults import Fault, FaultKind, FaultTable
from sim.values import PointSource, StaticSource

AVERAGE_WINDOW_S = 1.0  # nvmlDeviceGetPowerUsage averages over 1 s on Ampere and newer
GARBAGE_MW = 0xFFFFFFFF  # what an unsigned int reads as when the board returns nonsense


@dataclass(frozen=True, slots=True)
class FakeGpuSpec:
    """One simulated GPU: its id in the power tree, identity and limit range (W)."""

    device_id: str
    uuid: str
    min_w: float
    max_w: float
    default_w: float


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """Stands in for pynvml's opaque ``c_nvmlDevice_t``."""

    index: int


@dataclass
class _GpuState:
    spec: FakeGpuSpec
    requested_mw: int
    enforced_mw: int
    pending: tuple[int, float] | None = None  # (limit mW, due at clock s)
    energy_mj: float = 0.0
    last: tuple[float, float] | None = None  # (t_s, power_w) of the last sample
    changes: deque[tuple[float, float]] = field(default_factory=deque)  # where power changed
    instant_supported: bool = True
    ignore_sets: bool = False  # a tenant's hand-set limit wins over every set (rogue node)


class FakeNvml:
    """Module-like stand-in for ``pynvml``. Thread-safe: the driver calls it from its thread."""

    # Constants and error classes are pynvml's own objects, not copies with other identities.
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
    NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
    NVML_FI_DEV_POWER_AVERAGE = pynvml.NVML_FI_DEV_POWER_AVERAGE
    NVML_FI_DEV_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
    NVML_VALUE_TYPE_DOUBLE = pynvml.NVML_VALUE_TYPE_DOUBLE
    NVML_VALUE_TYPE_UNSIGNED_INT = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_INT = pynvml.NVML_VALUE_TYPE_SIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_SHORT = pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT

    NVMLError = pynvml.NVMLError
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_Unknown = pynvml.NVMLError_Unknown

    def __init__(
        self,
        gpus: Sequence[FakeGpuSpec],
        source: PointSource,
        *,
        faults: FaultTable | None = None,
        actuation_delay_s: float = 0.0,
        require_root: bool = False,
        root: bool | None = None,
        library_present: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.faults = faults if faults is not None else FaultTable()
        self.actuation_delay_s = actuation_delay_s
        self.require_root = require_root
        # Like the real library, privilege is the process's unless a test says otherwise.
        self.root = os.geteuid() == 0 if root is None else root
        self.library_present = library_present
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._init_count = 0
        self._gpus = [
            _GpuState(s, round(s.default_w * 1000), round(s.default_w * 1000)) for s in gpus
        ]
        self.set_calls = 0  # accepted sets, for tests that check nothing was applied
        self.ignored_sets = 0  # sets acknowledged but not applied (ignore_set_limit)

    @classmethod
    def for_node(
        cls,
        node_id: str,
        count: int,
        *,
        min_w: float,
        max_w: float,
        default_w: float | None = None,
        power_w: float = 0.0,
        source: PointSource | None = None,
        **kwargs: Any,
    ) -> FakeNvml:
        """``count`` identical GPUs ``<node_id>-g<i>``; without a source, a static one at
        ``power_w`` per GPU (writable, so the enforced limits land in it too)."""
        specs = [
            FakeGpuSpec(
                f"{node_id}-g{i}",
                f"GPU-fake-{node_id}-{i:02d}",
                min_w,
                max_w,
                max_w if default_w is None else default_w,
            )
            for i in range(count)
        ]
        if source is None:
            source = StaticSource(
                {
                    (s.device_id, p): v
                    for s in specs
                    for p, v in (("power_w", power_w), ("limit_w", s.default_w))
                }
            )
        return cls(specs, source, **kwargs)

    # --- plant and test side ------------------------------------------------------------

    def tick(self) -> None:
        """Sample every GPU's power and settle due limits; call at the plant's step."""
        now = self._clock()
        with self._lock:
            for g in self._gpus:
                self._settle(g, now)
                if self.faults.get(g.spec.device_id) is None:
                    self._sample(g, now)

    def enforced_limit_w(self, index: int) -> float:
        """The limit the GPU obeys now (what the plant should clamp its power to)."""
        with self._lock:
            g = self._gpus[index]
            self._settle(g, self._clock())
            return g.enforced_mw / 1000

    def requested_limit_w(self, index: int) -> float:
        """The last limit accepted by a set, enforced or still pending."""
        with self._lock:
            g = self._gpus[index]
            return (g.pending[0] if g.pending else g.requested_mw) / 1000

    def device_id(self, index: int) -> str:
        return self._gpus[index].spec.device_id

    def lose(self, index: int, lost: bool = True) -> None:
        """The GPU falls off the bus (GpuIsLost on every call) or comes back."""
        self.faults.set(self.device_id(index), Fault(FaultKind.GONE) if lost else None)

    def ignore_set_limit(
        self, index: int | None = None, ignore: bool = True, *, raise_to_w: float | None = None
    ) -> None:
        """A tenant with root takes the GPU (``index``; all of them when None) out of our hands.

        From now on a set succeeds and changes nothing; ``raise_to_w`` is the limit the
        tenant sets by hand, enforced at once (clipped to the GPU's range). ``ignore=False``
        gives the GPU back: the next set is applied again (the hand-set limit stays until then).
        """
        with self._lock:
            targets = self._gpus if index is None else [self._gpus[index]]
            for g in targets:
                g.ignore_sets = ignore
                if ignore and raise_to_w is not None:
                    w = min(max(raise_to_w, g.spec.min_w), g.spec.max_w)
                    g.pending = None
                    self._enforce(g, round(w * 1000))

    def set_instant_supported(self, index: int, supported: bool) -> None:
        """Older GPUs/drivers answer NotSupported for ``NVML_FI_DEV_POWER_INSTANT``."""
        with self._lock:
            self._gpus[index].instant_supported = supported

    # --- pynvml interface ---------------------------------------------------------------

    def nvmlInit(self) -> None:
        if not self.library_present:
            raise pynvml.NVMLError_LibraryNotFound()
        with self._lock:
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            if self._init_count == 0:
                raise pynvml.NVMLError_Uninitialized()
            self._init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self._gpus):
            raise pynvml.NVMLError_InvalidArgument()
        self._fault(index)
        return FakeHandle(index)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        g = self._enter(handle)
        return g.spec.uuid

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        garbage = self._garbage(handle)
        g = self._enter(handle)
        if garbage:
            return GARBAGE_MW
        with self._lock:
            return round(self._average_w(g, self._clock()) * 1000)

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: Sequence[Any]) -> Any:
        garbage = self._garbage(handle)
        g = self._enter(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        with self._lock:
            now = self._clock()
            for i, fid in enumerate(fieldIds):
                fv = values[i]
                fv.fieldId, fv.scopeId = fid if isinstance(fid, tuple) else (fid, 0)
                fv.timestamp = int(self._wall_clock() * 1e6)
                fv.latencyUsec = 0
                fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                if fv.fieldId == pynvml.NVML_FI_DEV_POWER_INSTANT and g.instant_supported:
                    power_mw = GARBAGE_MW if garbage else round(self._sample(g, now) * 1000)
                elif fv.fieldId == pynvml.NVML_FI_DEV_POWER_AVERAGE:
                    power_mw = GARBAGE_MW if garbage else round(self._average_w(g, now) * 1000)
                else:
                    fv.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                    continue
                fv.nvmlReturn = pynvml.NVML_SUCCESS
                fv.value.uiVal = power_mw
        return values

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        g = self._enter(handle)
        with self._lock:
            now = self._clock()
            self._sample(g, now)
            from_source = self.source.value(g.spec.device_id, "energy_j")
            return round(from_source * 1000 if from_source is not None else g.energy_mj)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        g = self._enter(handle)
        return g.enforced_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        g = self._enter(handle)
        return g.pending[0] if g.pending else g.requested_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        g = self._enter(handle)
        return [round(g.spec.min_w * 1000), round(g.spec.max_w * 1000)]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        g = self._enter(handle)
        return round(g.spec.default_w * 1000)

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:
        g = self._enter(handle)
        if self.require_root and not self.root:
            raise pynvml.NVMLError_NoPermission()
        if not round(g.spec.min_w * 1000) <= limit <= round(g.spec.max_w * 1000):
            raise pynvml.NVMLError_InvalidArgument()
        with self._lock:
            if g.ignore_sets:
                self.ignored_sets += 1
                return
            self.set_calls += 1
            if self.actuation_delay_s > 0:
                g.pending = (int(limit), self._clock() + self.actuation_delay_s)
            else:
                g.pending = None
                self._enforce(g, int(limit))

    # --- internals ----------------------------------------------------------------------

    def _check_init(self) -> None:
        if self._init_count == 0:
            raise pynvml.NVMLError_Uninitialized()

    def _fault(self, index: int) -> Fault | None:
        """Apply the GPU's fault, if any: raise, or block (outside the lock) for DELAY."""
        fault = self.faults.get(self._gpus[index].spec.device_id)
        if fault is None:
            return None
        if fault.kind is FaultKind.GONE:
            raise pynvml.NVMLError_GpuIsLost()
        if fault.kind is FaultKind.TIMEOUT:
            raise pynvml.NVMLError_Timeout()
        if fault.kind is FaultKind.EXCEPTION:
            raise pynvml.NVMLError_Unknown()
        if fault.kind is FaultKind.DELAY:
            self._sleep(fault.delay_s)
        return fault

    def _garbage(self, handle: FakeHandle) -> bool:
        fault = self.faults.get(self._gpus[handle.index].spec.device_id)
        return fault is not None and fault.kind is FaultKind.GARBAGE

    def _enter(self, handle: FakeHandle) -> _GpuState:
        self._check_init()
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self._gpus):
            raise pynvml.NVMLError_InvalidArgument()
        self._fault(handle.index)
        g = self._gpus[handle.index]
        with self._lock:
            self._settle(g, self._clock())
        return g

    def _settle(self, g: _GpuState, now: float) -> None:
        if g.pending is not None and now >= g.pending[1]:
            limit_mw, _ = g.pending
            g.pending = None
            self._enforce(g, limit_mw)

    def _enforce(self, g: _GpuState, limit_mw: int) -> None:
        g.requested_mw = g.enforced_mw = limit_mw
        self.source.write(g.spec.device_id, "limit_w", limit_mw / 1000)

    def _sample(self, g: _GpuState, now: float) -> float:
        """Take the plant's power now; advance the energy counter and the 1 s window.

        Power is piecewise constant between samples, so the window keeps only the points
        where it changed: a tight polling loop does not grow it.
        """
        power_w = self.source.value(g.spec.device_id, "power_w")
        if power_w is None:
            raise pynvml.NVMLError_Unknown()  # the plant has no such GPU: a wiring bug
        if g.last is not None:
            t_prev, p_prev = g.last
            if now < t_prev:
                return power_w
            g.energy_mj += p_prev * (now - t_prev) * 1000
        g.last = (now, power_w)
        if not g.changes or g.changes[-1][1] != power_w:
            g.changes.append((now, power_w))
        # Keep one change at or before the window's start: it covers the start.
        while len(g.changes) > 1 and g.changes[1][0] <= now - AVERAGE_WINDOW_S:
            g.changes.popleft()
        return power_w

    def _average_w(self, g: _GpuState, now: float) -> float:
        from_source = self.source.value(g.spec.device_id, "power_avg_w")
        current_w = self._sample(g, now)
        if from_source is not None:
            return from_source
        start = now - AVERAGE_WINDOW_S
        energy = span = 0.0
        # Each change holds until the next one; the last holds until now.
        ends = [t for t, _ in itertools.islice(g.changes, 1, None)] + [now]
        for (t0, p0), t1 in zip(g.changes, ends, strict=True):
            lo = max(t0, start)
            if t1 > lo:
                energy += p0 * (t1 - lo)
                span += t1 - lo
        return energy / span if span > 0 else current_w
