"""NVML driver against the simulator's fake NVML.

There is no GPU on the machines these tests run on, so libnvidia-ml cannot answer: the
fake (sim.fake_nvml.FakeNvml) stands in for it, speaking pynvml's interface (the same
function names, mW and mJ, pynvml's own c_nvmlFieldValue_t structs and exception classes).
Values are checked by reading back what the fake holds, never by a return code. One test
calls the real pynvml, which here must fail with LibraryNotFound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading

import pynvml
import pytest

from drivers.nvml import (
    POINTS,
    GpuLost,
    LimitNotEnforced,
    LimitOutOfRange,
    NvmlCallFailed,
    NvmlDriver,
    NvmlNotSupported,
    NvmlPermissionDenied,
    NvmlUnavailable,
    UnknownGpu,
    map_error,
)
from drivers.reading import Quality
from sim.fake_nvml import FakeGpuSpec, FakeHandle, FakeNvml
from sim.faults import Fault, FaultKind
from sim.values import StaticSource
from tests.helpers.clock import ManualClock


def specs(n: int = 3) -> list[FakeGpuSpec]:
    return [FakeGpuSpec(f"n1-g{i}", f"GPU-uuid-{i}", 200.0, 700.0, 600.0) for i in range(n)]


def source(powers_w: list[float]) -> StaticSource:
    values = {}
    for i, p in enumerate(powers_w):
        values[(f"n1-g{i}", "power_w")] = p
        values[(f"n1-g{i}", "limit_w")] = 600.0
    return StaticSource(values)


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(specs(), source([310.0, 420.5, 555.25]))


async def test_readings_equal_the_fakes_values_in_watts_and_joules() -> None:
    clock = ManualClock(100.0)
    src = source([300.0, 420.5, 555.25])
    fake = FakeNvml(specs(), src, clock=clock)
    fake.tick()
    clock.now_s += 0.5
    src.values[("n1-g0", "power_w")] = 500.0
    fake.tick()
    clock.now_s += 0.5
    async with NvmlDriver("n1", fake) as drv:
        samples = await drv.read_all()

    # Piecewise constant: 300 W for 0.5 s then 500 W for 0.5 s.
    g0 = samples[0]
    assert g0.power_instant_w == 500.0
    assert g0.power_avg_w == pytest.approx(400.0)
    assert g0.energy_j == pytest.approx(400.0)
    # Same clock instant, so the fake's own mW/mJ figures must match the driver's W/J.
    fake.nvmlInit()
    for s in samples:
        h = FakeHandle(s.index)
        assert s.power_avg_w == fake.nvmlDeviceGetPowerUsage(h) / 1000
        fv = fake.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
        assert s.power_instant_w == fv.value.uiVal / 1000
        assert s.energy_j == fake.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
        assert s.limit_w == fake.nvmlDeviceGetEnforcedPowerLimit(h) / 1000 == 600.0
        assert (s.min_w, s.max_w, s.default_w) == (200.0, 700.0, 600.0)
        assert s.uuid == f"GPU-uuid-{s.index}"
        assert s.quality is Quality.GOOD
    assert [s.power_instant_w for s in samples[1:]] == [420.5, 555.25]


async def test_average_covers_the_last_second_only() -> None:
    clock = ManualClock(100.0)
    src = source([300.0])
    fake = FakeNvml(specs(1), src, clock=clock)
    fake.tick()
    clock.now_s += 0.5
    src.values[("n1-g0", "power_w")] = 500.0
    fake.tick()  # the fake sees a change when it samples: the plant ticks it at its step
    for _ in range(15):  # a tight poll at constant power must not skew or grow anything
        clock.now_s += 0.1
        fake.tick()
    async with NvmlDriver("n1", fake) as drv:
        (s,) = await drv.read_all()
    assert s.power_avg_w == pytest.approx(500.0)
    assert s.energy_j == pytest.approx(300.0 * 0.5 + 500.0 * 1.5)


async def test_source_may_supply_average_and_energy() -> None:
    src = source([300.0])
    src.values[("n1-g0", "power_avg_w")] = 290.0
    src.values[("n1-g0", "energy_j")] = 123_456.789
    async with NvmlDriver("n1", FakeNvml(specs(1), src)) as drv:
        (s,) = await drv.read_all()
    assert (s.power_instant_w, s.power_avg_w, s.energy_j) == (300.0, 290.0, 123_456.789)


async def test_readings_carry_units_device_ids_and_quality(fake: FakeNvml) -> None:
    async with NvmlDriver("n1", fake) as drv:
        readings = await drv.read_readings()
    by_key = {(r.device, r.point): r for r in readings}
    assert by_key[("n1-g1", "power_w")].value == 420.5
    assert by_key[("n1-g1", "power_w")].unit == "W"
    assert by_key[("n1-g2", "energy_j")].unit == "J"
    assert by_key[("n1-g0", "max_limit_w")].value == 700.0
    assert {r.quality for r in readings} == {Quality.GOOD}
    assert [(r.point, r.unit) for r in readings if r.device == "n1-g0"] == list(POINTS)
    assert len(readings) == 3 * len(POINTS)


async def test_pollable_shape_connect_read_close(fake: FakeNvml) -> None:
    drv = NvmlDriver("n1", fake)
    assert drv.name == "n1-nvml"
    await drv.connect()
    try:
        readings = await drv.read()
    finally:
        await drv.close()
    assert {r.device for r in readings} == {"n1-g0", "n1-g1", "n1-g2"}
    with pytest.raises(pynvml.NVMLError_Uninitialized):  # close() shut NVML down
        fake.nvmlDeviceGetCount()


async def test_set_limit_is_enforced_by_the_fake(fake: FakeNvml) -> None:
    async with NvmlDriver("n1", fake) as drv:
        result = await drv.set_limit(1, 450.5)
        samples = await drv.read_all()
    assert result.confirmed and result.enforced_w == 450.5
    assert fake.enforced_limit_w(1) == 450.5
    assert fake.source.value("n1-g1", "limit_w") == 450.5  # what the plant sees
    assert [s.limit_w for s in samples] == [600.0, 450.5, 600.0]


async def test_set_limit_waits_for_the_actuation_delay() -> None:
    fake = FakeNvml(specs(1), source([300.0]), actuation_delay_s=0.05)
    async with NvmlDriver("n1", fake, confirm_timeout_s=5.0) as drv:
        result = await drv.set_limit(0, 300.0)
    assert result.confirmed and result.enforced_w == 300.0
    assert fake.enforced_limit_w(0) == 300.0


async def test_limit_that_never_takes_is_reported() -> None:
    fake = FakeNvml(specs(1), source([300.0]), actuation_delay_s=3600.0)
    async with NvmlDriver("n1", fake, confirm_timeout_s=0.1) as drv:
        with pytest.raises(LimitNotEnforced, match="still 600 W"):
            await drv.set_limit(0, 300.0)
    assert fake.requested_limit_w(0) == 300.0
    assert fake.enforced_limit_w(0) == 600.0


@pytest.mark.parametrize("limit_w", [199.9, 700.5, -5.0, math.nan, math.inf])
async def test_out_of_range_limit_refused_and_nothing_applied(
    fake: FakeNvml, limit_w: float
) -> None:
    async with NvmlDriver("n1", fake) as drv:
        with pytest.raises(LimitOutOfRange, match=r"\[200, 700\] W; nothing applied"):
            await drv.set_limit(0, limit_w)
    assert fake.set_calls == 0
    assert fake.enforced_limit_w(0) == fake.requested_limit_w(0) == 600.0
    assert fake.source.value("n1-g0", "limit_w") == 600.0


async def test_unknown_gpu_refused(fake: FakeNvml) -> None:
    async with NvmlDriver("n1", fake) as drv:
        with pytest.raises(UnknownGpu, match="no GPU 7"):
            await drv.set_limit(7, 400.0)


def test_fake_enforces_nvml_rules_with_pynvmls_own_errors(fake: FakeNvml) -> None:
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, 700_001)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(3)
    assert fake.nvmlDeviceGetPowerManagementLimitConstraints(h) == [200_000, 700_000]
    fake.require_root, fake.root = True, False
    with pytest.raises(pynvml.NVMLError_NoPermission):
        fake.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    fake.root = True
    fake.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    assert fake.nvmlDeviceGetEnforcedPowerLimit(h) == 300_000


async def test_no_permission_mapped_and_nothing_applied() -> None:
    fake = FakeNvml(specs(1), source([300.0]), require_root=True, root=False)
    async with NvmlDriver("n1", fake) as drv:
        with pytest.raises(
            NvmlPermissionDenied, match=r"setting a power limit needs root \(NVML NoPermission\)"
        ):
            await drv.set_limit(0, 400.0)
    assert fake.enforced_limit_w(0) == fake.requested_limit_w(0) == 600.0


async def test_library_not_found_mapped() -> None:
    fake = FakeNvml(specs(1), source([300.0]), library_present=False)
    drv = NvmlDriver("n1", fake)
    with pytest.raises(NvmlUnavailable, match="NVIDIA driver installed"):
        await drv.start()
    with pytest.raises(Exception, match="not started"):
        await drv.read_all()


async def test_real_pynvml_without_a_gpu_is_a_clear_error() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        with pytest.raises(NvmlUnavailable, match=r"libnvidia-ml.*NVML LibraryNotFound"):
            await NvmlDriver("n1").start()
        return
    pynvml.nvmlShutdown()  # a GPU node: the real library must then work through the driver
    async with NvmlDriver("n1") as drv:
        samples = await drv.read_all()
        assert len(samples) == len(drv.gpus)


async def test_lost_gpu_is_isolated(fake: FakeNvml) -> None:
    async with NvmlDriver("n1", fake) as drv:
        fake.lose(1)
        samples = await drv.read_all()
        assert [s.quality for s in samples] == [Quality.GOOD, Quality.ERROR, Quality.GOOD]
        assert samples[0].power_w == 310.0 and samples[2].power_w == 555.25
        lost = samples[1]
        assert lost.power_w is None and lost.limit_w is None
        assert lost.max_w == 700.0  # its range stays known
        assert lost.error is not None and "reset or a reboot" in lost.error
        assert "NVML GpuIsLost" in lost.error
        lost_readings = lost.readings("n1-g1")
        assert {r.quality for r in lost_readings} == {Quality.ERROR}
        with pytest.raises(GpuLost):
            await drv.set_limit(1, 400.0)
        stats = drv.stats()
        assert stats.errors == {1: 1} and set(stats.last_good_ts_s) == {0, 2}

        fake.lose(1, lost=False)
        samples = await drv.read_all()
    assert samples[1].quality is Quality.GOOD and samples[1].power_w == 420.5


async def test_gpu_lost_before_start_is_opened_when_it_returns(fake: FakeNvml) -> None:
    fake.lose(2)
    async with NvmlDriver("n1", fake) as drv:
        assert drv.gpus[2] is None and drv.gpus[0] is not None
        assert (await drv.read_all())[2].quality is Quality.ERROR
        fake.lose(2, lost=False)
        samples = await drv.read_all()
        assert samples[2].quality is Quality.GOOD and samples[2].uuid == "GPU-uuid-2"
        assert drv.gpus[2] is not None


async def test_instant_not_supported_falls_back_to_average_and_says_so_once(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake.set_instant_supported(0, False)
    caplog.set_level(logging.WARNING, logger="drivers.nvml")
    async with NvmlDriver("n1", fake) as drv:
        for _ in range(3):
            samples = await drv.read_all()
    s0, s1 = samples[0], samples[1]
    assert s0.instant_is_average and s0.quality is Quality.GOOD
    assert s0.power_instant_w == s0.power_avg_w == 310.0
    assert not s1.instant_is_average
    warnings = [r for r in caplog.records if "instantaneous power" in r.getMessage()]
    assert len(warnings) == 1 and "GPU 0" in warnings[0].getMessage()


async def test_generic_nvml_error_marks_the_gpu_and_spares_the_others(fake: FakeNvml) -> None:
    fake.faults.set("n1-g0", Fault(FaultKind.EXCEPTION))
    async with NvmlDriver("n1", fake) as drv:
        samples = await drv.read_all()
    assert samples[0].quality is Quality.ERROR
    assert samples[0].error is not None and "NVML Unknown" in samples[0].error
    assert samples[1].quality is Quality.GOOD and samples[1].power_w == 420.5


async def test_garbage_power_is_marked_bad(fake: FakeNvml) -> None:
    fake.faults.set("n1-g2", Fault(FaultKind.GARBAGE))
    async with NvmlDriver("n1", fake) as drv:
        samples = await drv.read_all()
    assert samples[2].quality is Quality.BAD
    assert samples[2].error is not None and "implausible power" in samples[2].error
    bad = {r.point: r.quality for r in samples[2].readings("n1-g2")}
    assert bad["power_w"] is Quality.BAD and bad["limit_w"] is Quality.GOOD
    assert samples[0].quality is Quality.GOOD


@pytest.mark.parametrize(
    ("error", "mapped", "text"),
    [
        (pynvml.NVMLError_NoPermission, NvmlPermissionDenied, "needs root (NVML NoPermission)"),
        (pynvml.NVMLError_NotSupported, NvmlNotSupported, "does not support"),
        (pynvml.NVMLError_GpuIsLost, GpuLost, "GPU is lost"),
        (pynvml.NVMLError_LibraryNotFound, NvmlUnavailable, "NVIDIA driver"),
        (pynvml.NVMLError_DriverNotLoaded, NvmlUnavailable, "NVIDIA driver"),
        (pynvml.NVMLError_InvalidArgument, NvmlCallFailed, "Invalid Argument"),
    ],
)
def test_each_nvml_error_maps_to_a_driver_error(
    error: type[Exception], mapped: type[Exception], text: str
) -> None:
    err = map_error(pynvml, error(), "setting a power limit", 3)
    assert type(err) is mapped and text in str(err)


def test_bare_nvml_error_code_maps_to_call_failed() -> None:
    err = map_error(pynvml, pynvml.NVMLError(999), "reading power", 0)
    assert type(err) is NvmlCallFailed and "GPU 0: reading power failed" in str(err)


async def test_blocking_nvml_call_does_not_block_the_event_loop() -> None:
    """The fake's call blocks until an asyncio timer opens a gate: that can only happen if
    the loop keeps running while the NVML call is in progress (no timing asserted)."""
    gate = threading.Event()
    opened: list[bool] = []

    def blocking_sleep(_delay_s: float) -> None:
        opened.append(gate.wait(timeout=10.0))

    fake = FakeNvml(specs(2), source([300.0, 400.0]), sleep=blocking_sleep)
    async with NvmlDriver("n1", fake) as drv:
        fake.faults.set("n1-g0", Fault(FaultKind.DELAY, delay_s=0.2))
        read = asyncio.create_task(drv.read_all())
        await asyncio.sleep(0.01)
        assert not read.done()
        gate.set()
        samples = await read
    assert opened and all(opened)
    assert [s.power_w for s in samples] == [300.0, 400.0]


async def test_calls_are_serialised_on_one_worker_thread(fake: FakeNvml) -> None:
    threads: set[str] = set()

    class Recording(StaticSource):
        def value(self, device_id: str, point: str) -> float | None:
            threads.add(threading.current_thread().name)
            return super().value(device_id, point)

    fake.source = Recording(source([310.0, 420.5, 555.25]).values)
    async with NvmlDriver("n1", fake) as drv:
        await asyncio.gather(drv.read_all(), drv.read_all(), drv.set_limit(0, 500.0))
    assert len(threads) == 1
    assert threading.current_thread().name not in threads
    assert next(iter(threads)).startswith("nvml")
