"""NVML driver: per-GPU power, energy and power limits on a GPU node, and setting a limit.

The node agent reads every GPU at 1-10 Hz and applies leased caps. NVML is a blocking C
library, so every call runs on ONE dedicated worker thread: the event loop never waits on
the driver, and calls are serialised (NVML is thread-safe, but one thread is cheap and keeps
the order of a set followed by its read-back obvious). A sweep over all GPUs is one hop to
that thread, not one per call.

The backend is any object with pynvml's function names, constants and error classes: the
real ``pynvml`` on a GPU node, ``sim.fake_nvml.FakeNvml`` in the simulator and in tests.
Units: NVML speaks mW and mJ; everything leaving this module is W and J.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from drivers.reading import Quality, Reading

log = logging.getLogger(__name__)

T = TypeVar("T")

# (point, unit) of every Reading a GPU reports, in GpuSample.readings() order.
POINTS: tuple[tuple[str, str], ...] = (
    ("power_w", "W"),  # instantaneous where the GPU offers it, else the 1 s average
    ("power_avg_w", "W"),
    ("energy_j", "J"),  # since the driver was loaded
    ("limit_w", "W"),  # enforced
    ("min_limit_w", "W"),
    ("max_limit_w", "W"),
    ("default_limit_w", "W"),
)

# A limit read back within this of the request counts as applied: NVML stores mW integers
# and some boards round to a coarser step.
LIMIT_TOLERANCE_W = 1.0


class NvmlBackend(Protocol):
    """What the driver needs from ``pynvml`` (and what the fake NVML provides)."""

    NVML_SUCCESS: int
    NVML_ERROR_NOT_SUPPORTED: int
    NVML_FI_DEV_POWER_INSTANT: int
    NVML_VALUE_TYPE_DOUBLE: int
    NVML_VALUE_TYPE_UNSIGNED_INT: int
    NVML_VALUE_TYPE_UNSIGNED_LONG: int
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: int
    NVML_VALUE_TYPE_SIGNED_LONG_LONG: int
    NVML_VALUE_TYPE_SIGNED_INT: int
    NVML_VALUE_TYPE_UNSIGNED_SHORT: int

    NVMLError: type[Exception]
    NVMLError_NoPermission: type[Exception]
    NVMLError_NotSupported: type[Exception]
    NVMLError_GpuIsLost: type[Exception]
    NVMLError_LibraryNotFound: type[Exception]
    NVMLError_DriverNotLoaded: type[Exception]
    NVMLError_InvalidArgument: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> Sequence[int]: ...
    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int: ...
    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None: ...


# --- errors -------------------------------------------------------------------------------


class NvmlDriverError(Exception):
    """Base of every error this driver raises; ``index`` is the GPU (None: the whole node)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class NvmlUnavailable(NvmlDriverError):
    """No NVML on this machine: the NVIDIA driver is not installed or not loaded."""


class NvmlPermissionDenied(NvmlDriverError):
    """NVML refused for lack of privilege (setting a limit needs root)."""


class NvmlNotSupported(NvmlDriverError):
    """This GPU or driver does not offer the requested query or control."""


class GpuLost(NvmlDriverError):
    """The GPU fell off the bus or hung; only a reset or reboot brings it back."""


class UnknownGpu(NvmlDriverError):
    """No GPU with that index on this node."""


class LimitOutOfRange(NvmlDriverError):
    """A requested limit outside the GPU's [min, max]: refused before touching the GPU."""


class LimitNotEnforced(NvmlDriverError):
    """NVML accepted the limit but the enforced limit read back stayed above it."""


class NvmlCallFailed(NvmlDriverError):
    """Any other NVML error."""


def _nvml_name(exc: BaseException) -> str:
    # pynvml's classes are NVMLError_<Name>; the bare NVMLError carries only a code.
    name = type(exc).__name__
    return name.removeprefix("NVMLError_") if name != "NVMLError" else f"error {exc}"


def map_error(
    nvml: NvmlBackend, exc: BaseException, action: str, index: int | None = None
) -> NvmlDriverError:
    """Turn a pynvml exception into a driver error a facility engineer can act on."""
    where = f"GPU {index}: " if index is not None else ""
    tag = f"(NVML {_nvml_name(exc)})"
    if isinstance(exc, nvml.NVMLError_NoPermission):
        return NvmlPermissionDenied(f"{where}{action} needs root {tag}", index)
    if isinstance(exc, nvml.NVMLError_NotSupported):
        return NvmlNotSupported(f"{where}this GPU does not support {action} {tag}", index)
    if isinstance(exc, nvml.NVMLError_GpuIsLost):
        return GpuLost(
            f"{where}GPU is lost (fell off the bus or hung); it needs a reset or a reboot, "
            f"while {action} {tag}",
            index,
        )
    if isinstance(exc, (nvml.NVMLError_LibraryNotFound, nvml.NVMLError_DriverNotLoaded)):
        return NvmlUnavailable(
            f"NVML is not available on this machine: is the NVIDIA driver installed and "
            f"loaded (libnvidia-ml.so.1)? {tag}",
            index,
        )
    return NvmlCallFailed(f"{where}{action} failed: {exc} {tag}", index)


# --- snapshots ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while the driver runs: identity and the limit range."""

    index: int
    uuid: str
    min_w: float
    max_w: float
    default_w: float


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one moment. A value is None when it could not be read (see ``errors``).

    ``quality`` is ERROR when the GPU could not be read at all (lost), BAD when a value
    read is implausible, GOOD otherwise. ``instant_is_average`` says ``power_instant_w``
    is the 1 s average because this GPU does not offer the instantaneous field.
    """

    index: int
    uuid: str
    power_avg_w: float | None
    power_instant_w: float | None
    energy_j: float | None
    limit_w: float | None
    min_w: float | None
    max_w: float | None
    default_w: float | None
    ts_s: float
    wall_ts_s: float
    quality: Quality = Quality.GOOD
    error: str | None = None
    errors: tuple[tuple[str, str], ...] = ()
    instant_is_average: bool = False

    @property
    def power_w(self) -> float | None:
        """The best power figure: instantaneous where offered, else the 1 s average."""
        return self.power_instant_w if self.power_instant_w is not None else self.power_avg_w

    def readings(self, device: str) -> list[Reading]:
        """One Reading per point, for the readings store; unreadable points carry ERROR."""
        point_errors = dict(self.errors)
        values = (
            self.power_w,
            self.power_avg_w,
            self.energy_j,
            self.limit_w,
            self.min_w,
            self.max_w,
            self.default_w,
        )
        out = []
        for (point, unit), value in zip(POINTS, values, strict=True):
            error: str | None
            if value is None or self.quality is Quality.ERROR:
                quality = Quality.ERROR
                error = point_errors.get(point) or self.error or "not read"
                value = math.nan if value is None else value
            else:
                quality = Quality.BAD if point in point_errors else Quality.GOOD
                error = point_errors.get(point)
            out.append(
                Reading(device, point, value, unit, self.ts_s, self.wall_ts_s, quality, error)
            )
        return out


@dataclass(frozen=True, slots=True)
class LimitResult:
    """Outcome of a set: ``enforced_w`` is read back from NVML, not echoed from the request.

    ``confirmed`` is False when the enforced limit is lower than requested (another, lower
    limit is in force, e.g. one set out of band by the BMC): safe, but not what was asked.
    """

    index: int
    requested_w: float
    enforced_w: float
    confirmed: bool


@dataclass(frozen=True, slots=True)
class NvmlStats:
    """Self-telemetry for /metrics."""

    sweeps: int
    last_sweep_s: float
    errors: dict[int, int]
    last_good_ts_s: dict[int, float]


# --- the driver ---------------------------------------------------------------------------


@dataclass
class _Gpu:
    index: int
    handle: Any = None
    info: GpuInfo | None = None
    instant_supported: bool = True


def _decode_field(nvml: NvmlBackend, fv: Any) -> float:
    """The value of a ``c_nvmlFieldValue_t`` by its declared type (a C union)."""
    by_type = {
        nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }
    member = by_type.get(int(fv.valueType))
    if member is None:
        raise ValueError(f"unknown NVML value type {fv.valueType}")
    return float(getattr(fv.value, member))


class NvmlDriver:
    """Async NVML driver for the GPUs of one node.

    ``async with NvmlDriver(node_id="r1-n1") as drv: samples = await drv.read_all()``.
    """

    def __init__(
        self,
        node_id: str = "",
        backend: NvmlBackend | None = None,
        *,
        confirm_timeout_s: float = 1.0,
        confirm_poll_s: float = 0.02,
    ) -> None:
        if backend is None:
            import pynvml

            backend = pynvml
        self._nvml: NvmlBackend = backend
        self.node_id = node_id
        self._confirm_timeout_s = confirm_timeout_s
        self._confirm_poll_s = confirm_poll_s
        self._executor: ThreadPoolExecutor | None = None
        self._gpus: list[_Gpu] = []
        self._sweeps = 0
        self._last_sweep_s = 0.0
        self._errors: dict[int, int] = {}
        self._last_good: dict[int, float] = {}

    # lifecycle

    async def start(self) -> None:
        """Initialise NVML and learn the GPUs. Raises NvmlUnavailable on a node without it."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        try:
            self._gpus = await self._call(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._call(self._nvml.nvmlShutdown)
        except Exception as exc:  # shutting down: nothing left to protect
            log.warning("nvmlShutdown failed: %s", exc)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> NvmlDriver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # public API

    def device_id(self, index: int) -> str:
        """The GPU's id in the power tree (``<node>-g<index>``, as the site config names it)."""
        return f"{self.node_id}-g{index}"

    @property
    def gpus(self) -> list[GpuInfo | None]:
        """Static info per GPU index; None for a GPU that could not be opened (lost at start)."""
        return [g.info for g in self._gpus]

    async def read_all(self) -> list[GpuSample]:
        """One sample per GPU. Never raises for one GPU's failure: that GPU reads ERROR."""
        t0 = time.perf_counter()
        samples = await self._call(self._sweep)
        # Bookkeeping on the loop side, so stats() never races the worker thread.
        self._sweeps += 1
        self._last_sweep_s = time.perf_counter() - t0
        for s in samples:
            if s.quality is Quality.GOOD:
                self._last_good[s.index] = s.ts_s
            else:
                self._errors[s.index] = self._errors.get(s.index, 0) + 1
        return samples

    async def read_readings(self) -> list[Reading]:
        """Every point of every GPU as Readings, device ids as in the power tree."""
        samples = await self.read_all()
        return [r for s in samples for r in s.readings(self.device_id(s.index))]

    async def set_limit(self, index: int, limit_w: float) -> LimitResult:
        """Set GPU ``index``'s power limit and confirm it by reading the enforced limit back.

        Refuses (LimitOutOfRange, nothing applied) a value outside the GPU's [min, max].
        Raises LimitNotEnforced if the enforced limit stays above the request for
        ``confirm_timeout_s`` (the cap did not take: the GPU may draw more than asked).
        """
        requested_mw = await self._call(lambda: self._apply_limit(index, limit_w))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._confirm_timeout_s
        while True:
            enforced_mw = await self._call(lambda: self._enforced_mw(index))
            if abs(enforced_mw - requested_mw) <= LIMIT_TOLERANCE_W * 1000:
                return LimitResult(index, limit_w, enforced_mw / 1000, True)
            if loop.time() >= deadline:
                break
            await asyncio.sleep(self._confirm_poll_s)
        enforced_w = enforced_mw / 1000
        if enforced_w > limit_w:
            raise LimitNotEnforced(
                f"GPU {index}: limit {limit_w:g} W was accepted but the enforced limit is "
                f"still {enforced_w:g} W after {self._confirm_timeout_s:g} s",
                index,
            )
        log.info(
            "GPU %d: asked for %g W, a lower limit of %g W is in force", index, limit_w, enforced_w
        )
        return LimitResult(index, limit_w, enforced_w, False)

    # Most of drivers.base.Pollable's shape, so a PollGroup adapter is a few lines
    # (point keys: POINTS for every device_id(i)).

    @property
    def name(self) -> str:
        return f"{self.node_id}-nvml" if self.node_id else "nvml"

    async def connect(self) -> None:
        if self._executor is None:
            await self.start()

    async def read(self) -> list[Reading]:
        return await self.read_readings()

    def stats(self) -> NvmlStats:
        return NvmlStats(
            self._sweeps, self._last_sweep_s, dict(self._errors), dict(self._last_good)
        )

    # worker-thread side: everything below runs on the NVML thread

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise NvmlDriverError("NVML driver not started: call start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _open(self) -> list[_Gpu]:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise map_error(nvml, exc, "initialising NVML") from exc
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            nvml.nvmlShutdown()  # balance the init: NVML counts them
            raise map_error(nvml, exc, "counting GPUs") from exc
        gpus = [_Gpu(i) for i in range(count)]
        for gpu in gpus:
            try:
                self._open_gpu(gpu)
            except NvmlDriverError as exc:
                log.error("%s", exc)  # retried on every sweep; its samples read ERROR
        return gpus

    def _open_gpu(self, gpu: _Gpu) -> None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            default_mw = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        except nvml.NVMLError as exc:
            raise map_error(nvml, exc, "reading identity and limit range", gpu.index) from exc
        gpu.handle = handle
        gpu.info = GpuInfo(
            gpu.index,
            uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            min_mw / 1000,
            max_mw / 1000,
            default_mw / 1000,
        )

    def _gpu(self, index: int) -> _Gpu:
        if not 0 <= index < len(self._gpus):
            raise UnknownGpu(f"no GPU {index} on this node ({len(self._gpus)} GPUs)", index)
        gpu = self._gpus[index]
        if gpu.info is None:
            self._open_gpu(gpu)
        return gpu

    def _sweep(self) -> list[GpuSample]:
        return [self._read_gpu(g) for g in self._gpus]

    def _read_gpu(self, gpu: _Gpu) -> GpuSample:
        nvml = self._nvml
        ts_s, wall_ts_s = time.monotonic(), time.time()
        try:
            if gpu.info is None:
                self._open_gpu(gpu)
            assert gpu.info is not None
            info, handle = gpu.info, gpu.handle
            errors: list[tuple[str, str]] = []

            def point(name: str, action: str, fn: Callable[[], float | None]) -> float | None:
                # A lost GPU fails the whole sample; anything else fails just this point.
                try:
                    return fn()
                except nvml.NVMLError as exc:
                    err = map_error(nvml, exc, action, gpu.index)
                    if isinstance(err, GpuLost):
                        raise err from exc
                    errors.append((name, str(err)))
                    return None

            avg_w = point(
                "power_avg_w",
                "reading power",
                lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            )
            instant_w = point("power_w", "reading instantaneous power", lambda: self._instant(gpu))
            energy_j = point(
                "energy_j",
                "reading total energy",
                lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000,
            )
            limit_w = point(
                "limit_w",
                "reading the enforced power limit",
                lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            )
        except NvmlDriverError as exc:
            log.debug("%s", exc)
            known = gpu.info  # the limit range stays known for a GPU lost after start
            return GpuSample(
                gpu.index,
                known.uuid if known else "",
                None,
                None,
                None,
                None,
                known.min_w if known else None,
                known.max_w if known else None,
                known.default_w if known else None,
                ts_s,
                wall_ts_s,
                Quality.ERROR,
                str(exc),
            )
        fallback = not gpu.instant_supported
        if fallback:
            instant_w = avg_w
        errors.extend(_implausible(info, avg_w, instant_w, limit_w))
        # No power at all is as bad as no answer: the policy must take it as worst case.
        if avg_w is None and instant_w is None:
            quality = Quality.ERROR
        else:
            quality = Quality.BAD if errors else Quality.GOOD
        return GpuSample(
            gpu.index,
            info.uuid,
            avg_w,
            instant_w,
            energy_j,
            limit_w,
            info.min_w,
            info.max_w,
            info.default_w,
            ts_s,
            wall_ts_s,
            quality,
            "; ".join(msg for _, msg in errors) or None,
            tuple(errors),
            fallback,
        )

    def _instant(self, gpu: _Gpu) -> float | None:
        """Instantaneous power (W) from the field value; None where the GPU does not offer it.

        NotSupported is remembered (and said once): the sweep then stops asking and the
        sample carries the 1 s average, flagged ``instant_is_average``.
        """
        nvml = self._nvml
        if not gpu.instant_supported:
            return None
        try:
            fv = nvml.nvmlDeviceGetFieldValues(gpu.handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
            ret = int(fv.nvmlReturn)
            if ret != nvml.NVML_SUCCESS:
                # The call succeeded but this field did not: the field carries its own code.
                raise nvml.NVMLError(ret)
        except nvml.NVMLError_NotSupported:
            gpu.instant_supported = False
            log.warning(
                "GPU %d does not offer instantaneous power (NVML_FI_DEV_POWER_INSTANT "
                "NotSupported): using the 1 s average instead",
                gpu.index,
            )
            return None
        return _decode_field(nvml, fv) / 1000

    def _apply_limit(self, index: int, limit_w: float) -> int:
        nvml = self._nvml
        gpu = self._gpu(index)
        try:
            # Constraints re-read (not cached) so the check matches what NVML will enforce.
            min_mw, max_mw = nvml.nvmlDeviceGetPowerManagementLimitConstraints(gpu.handle)
        except nvml.NVMLError as exc:
            raise map_error(nvml, exc, "reading the power limit range", index) from exc
        if not math.isfinite(limit_w) or not min_mw <= round(limit_w * 1000) <= max_mw:
            raise LimitOutOfRange(
                f"GPU {index}: power limit {limit_w:g} W refused, outside the GPU's range "
                f"[{min_mw / 1000:g}, {max_mw / 1000:g}] W; nothing applied",
                index,
            )
        requested_mw = round(limit_w * 1000)
        try:
            nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, requested_mw)
        except nvml.NVMLError as exc:
            raise map_error(nvml, exc, "setting a power limit", index) from exc
        return requested_mw

    def _enforced_mw(self, index: int) -> int:
        nvml = self._nvml
        gpu = self._gpu(index)
        try:
            return int(nvml.nvmlDeviceGetEnforcedPowerLimit(gpu.handle))
        except nvml.NVMLError as exc:
            raise map_error(nvml, exc, "reading back the enforced power limit", index) from exc


def _implausible(
    info: GpuInfo, avg_w: float | None, instant_w: float | None, limit_w: float | None
) -> list[tuple[str, str]]:
    """Garbage guard: a value no working GPU can show is BAD, not a reading to act on."""
    ceiling_w = 2 * info.max_w
    out = []
    for name, value in (("power_avg_w", avg_w), ("power_w", instant_w)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= ceiling_w):
            out.append((name, f"GPU {info.index}: implausible power {value:g} W"))
    # Below min is possible (a lower limit set out of band); above max is not.
    if limit_w is not None and not (
        math.isfinite(limit_w) and 0 <= limit_w <= info.max_w + LIMIT_TOLERANCE_W
    ):
        out.append(("limit_w", f"GPU {info.index}: enforced limit {limit_w:g} W outside its range"))
    return out
