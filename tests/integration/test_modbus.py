"""Modbus driver against the simulator's Modbus frontend on loopback, and against mbpoll.

Real parts only: the pymodbus server with our live action, our driver, and Debian's mbpoll
(a real Modbus master written in C). Fault tests poll several devices at once and assert
that the faulty one shows its fault while the others stay fresh and on schedule.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DeviceParams, PollGroup, PollSettings, WriteRejected
from drivers.devicemap import DEFAULT_MAP_DIR, ModbusMap, load_map_file, load_modbus_map
from drivers.modbus import build_modbus_devices
from drivers.reading import Quality, Reading
from sim.faults import Fault, FaultKind, FaultTable
from sim.modbus_server import ModbusFrontend, SimModbusDevice
from sim.values import StaticSource
from tests.helpers.tools import require_tool
from tests.unit.test_devicemaps import close_enough, resolution, sample_value

RECT = "generic-hvdc-rectifier-800v"
SST = "generic-sst-mv800"
PERIOD_S = 0.2
TIMEOUT_S = 0.1


@pytest.fixture(autouse=True)
def _quiet_pymodbus() -> Iterator[None]:
    # Fault tests make pymodbus log every dropped request at ERROR level.
    logger = logging.getLogger("pymodbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def source_for(devices: Sequence[tuple[str, str]]) -> StaticSource:
    """Every point of every (device, map) at a sample value the map allows."""
    src = StaticSource()
    for device, map_name in devices:
        m = load_modbus_map(map_name)
        for name, p in m.points.items():
            v = sample_value(name, p)
            if isinstance(v, float | int) and p.sim_value is None:
                src.values[(device, name)] = float(v)
    return src


def params(fe: ModbusFrontend, device: str, map_name: str, **kw: object) -> DeviceParams:
    ep = fe.endpoint(device)
    return DeviceParams(
        device,
        "modbus",
        host=ep.host,
        port=ep.port,
        map_name=map_name,
        period_s=PERIOD_S,
        timeout_s=TIMEOUT_S,
        stale_s=3 * PERIOD_S,
        options={"unit_id": ep.unit_id, **kw},
    )


class Store:
    """A minimal readings store: every reading in order, per device."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)

    def of(self, device: str, point: str) -> list[Reading]:
        return [r for r in self.readings if r.device == device and r.point == point]


# --- mbpoll --------------------------------------------------------------------------------


async def run_tool(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    return proc.returncode or 0, out.decode(), err.decode()


def mbpoll_value(stdout: str, address: int) -> str:
    for line in stdout.splitlines():
        if line.startswith(f"[{address}]:"):
            return line.split("]:", 1)[1].strip()
    raise AssertionError(f"no [{address}] in mbpoll output:\n{stdout}")


async def test_mbpoll_reads_the_rectifier_output_power_the_source_serves() -> None:
    mbpoll = require_tool("mbpoll")
    src = StaticSource({("shelf-1", "output_power_w"): 98765.4, ("sst-1", "output_power_w"): 1.5e6})
    devs = [SimModbusDevice("shelf-1", RECT, unit_id=3), SimModbusDevice("sst-1", SST)]
    async with ModbusFrontend(devs, src) as fe:
        ep = fe.endpoint("shelf-1")
        assert ep.probe["point"] == "output_power_w"
        rc, out, err = await run_tool(
            mbpoll,
            "-m",
            "tcp",
            "-a",
            str(ep.unit_id),
            "-0",
            "-r",
            str(ep.probe["address"]),
            "-c",
            "1",
            "-t",
            "4:float",
            "-B",
            "-1",
            "-o",
            "2",
            "-p",
            str(ep.port),
            ep.host,
        )
        assert rc == 0, err
        assert float(mbpoll_value(out, int(ep.probe["address"]))) == pytest.approx(98765.4)

        # The plant moves: the next read serves the new value (live, not a snapshot).
        src.values[("shelf-1", "output_power_w")] = 123456.0
        rc, out, err = await run_tool(
            mbpoll,
            "-a",
            "3",
            "-0",
            "-r",
            "16",
            "-c",
            "1",
            "-t",
            "4:float",
            "-B",
            "-1",
            "-p",
            str(ep.port),
            "127.0.0.1",
        )
        assert rc == 0, err
        assert float(mbpoll_value(out, 16)) == 123456.0

        # The SST's floats are word-swapped (CDAB): mbpoll's default word order, no -B.
        sst = fe.endpoint("sst-1")
        rc, out, err = await run_tool(
            mbpoll,
            "-a",
            "1",
            "-0",
            "-r",
            str(sst.probe["address"]),
            "-c",
            "1",
            "-t",
            "4:float",
            "-1",
            "-p",
            str(sst.port),
            "127.0.0.1",
        )
        assert rc == 0, err
        assert float(mbpoll_value(out, int(sst.probe["address"]))) == 1.5e6


async def test_mbpoll_sees_exception_and_writes_go_through_the_map() -> None:
    mbpoll = require_tool("mbpoll")
    src = StaticSource({("shelf-1", "current_limit_a"): 100.0})
    faults = FaultTable()
    async with ModbusFrontend([SimModbusDevice("shelf-1", RECT)], src, faults) as fe:
        port = str(fe.endpoint("shelf-1").port)
        # current_limit_a is uint16 * 0.1 A at 60: writing 2500 sets 250.0 A in the plant
        rc, _, err = await run_tool(
            mbpoll, "-a", "1", "-0", "-r", "60", "-1", "-p", port, "127.0.0.1", "2500"
        )
        assert rc == 0, err
        assert src.values[("shelf-1", "current_limit_a")] == 250.0
        # a read-only register refuses the write (0x02); the plant is unchanged
        rc, _, err = await run_tool(
            mbpoll, "-a", "1", "-0", "-r", "43", "-1", "-p", port, "127.0.0.1", "7"
        )
        assert rc != 0 and "Illegal data address" in err
        faults.set("shelf-1", Fault(FaultKind.EXCEPTION, exception_code=6))
        rc, _, err = await run_tool(
            mbpoll, "-a", "1", "-0", "-r", "16", "-1", "-p", port, "127.0.0.1"
        )
        assert rc != 0 and "busy" in err.lower()


# --- every map over the wire -------------------------------------------------------------

MODBUS_MAPS = [
    p.stem
    for p in sorted(DEFAULT_MAP_DIR.glob("*.yaml"))
    if isinstance(load_map_file(p), ModbusMap)
]


@pytest.mark.parametrize("map_name", MODBUS_MAPS)
async def test_every_point_of_every_map_survives_the_wire(map_name: str) -> None:
    src = source_for([("dev", map_name)])
    async with ModbusFrontend([SimModbusDevice("dev", map_name, unit_id=7)], src) as fe:
        [dev] = build_modbus_devices([params(fe, "dev", map_name)])
        await dev.connect()
        try:
            readings = {r.point: r for r in await dev.read()}
            strings = await dev.read_strings()
        finally:
            await dev.close()
    m = load_modbus_map(map_name)
    assert set(readings) == set(m.numeric_points())
    for name, r in readings.items():
        p = m.points[name]
        want = sample_value(name, p)
        assert r.quality is Quality.GOOD, (name, r.error)
        assert isinstance(want, float | int)
        sf = 0
        if p.scale_point:
            sf = int(readings[p.scale_point].value)
        assert close_enough(r.value, float(want), resolution(p, sf)), (name, r.value, want)
        assert r.unit == p.unit
    # Strings are identity, not plant values: the frontend serves the model name there.
    assert set(strings) == {n for n, p in m.points.items() if p.type == "string"}
    for name, text in strings.items():
        length = 2 * m.points[name].registers
        assert text == (m.model[:length] if name in ("model_name", "mfr_model") else "")


# --- the driver on a gateway -----------------------------------------------------------------


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[ModbusFrontend, StaticSource, FaultTable]]:
    """Four shelves behind one gateway port (units 1-4) and one SST alone on its port."""
    devs = [SimModbusDevice(f"shelf-{u}", RECT, unit_id=u, gateway="gw") for u in range(1, 5)]
    devs.append(SimModbusDevice("sst-1", SST))
    src = source_for([(d.device_id, d.map_name) for d in devs])
    for u in range(1, 5):
        src.values[(f"shelf-{u}", "output_power_w")] = 100_000.0 * u
    faults = FaultTable()
    async with ModbusFrontend(devs, src, faults) as fe:
        yield fe, src, faults


def device_params(fe: ModbusFrontend) -> list[DeviceParams]:
    return [params(fe, f"shelf-{u}", RECT) for u in range(1, 5)] + [params(fe, "sst-1", SST)]


async def test_gateway_units_share_one_connection_and_read_their_own_values(
    gateway: tuple[ModbusFrontend, StaticSource, FaultTable],
) -> None:
    fe, _, _ = gateway
    devices = build_modbus_devices(device_params(fe))
    shelves = devices[:4]
    assert len({id(d.conn) for d in shelves}) == 1  # one client for the gateway
    assert devices[4].conn is not shelves[0].conn
    store = Store()
    async with PollGroup(store) as group:
        for d in devices:
            group.add(d, PollSettings(PERIOD_S, TIMEOUT_S))
        await asyncio.sleep(6 * PERIOD_S)
        stats = group.stats()
    for u in range(1, 5):
        latest = store.of(f"shelf-{u}", "output_power_w")[-1]
        assert latest.quality is Quality.GOOD
        assert latest.value == 100_000.0 * u  # no unit got another unit's answer
        assert stats[f"shelf-{u}"].errors == 0
        assert stats[f"shelf-{u}"].polls >= 3
        assert stats[f"shelf-{u}"].last_good_s is not None
    assert store.of("sst-1", "output_power_w")[-1].quality is Quality.GOOD
    # Poll tasks closed their devices; the shared connection is closed with the last one.
    assert not shelves[0].conn.connected


def latest(store: Store, device: str, point: str = "output_power_w") -> Reading:
    return store.of(device, point)[-1]


def assert_fresh_and_on_time(store: Store, devices: Sequence[str], now_s: float) -> None:
    """Isolation: healthy devices kept being read, GOOD, on their period."""
    for dev in devices:
        rs = store.of(dev, "output_power_w")
        assert rs, dev
        assert rs[-1].quality is Quality.GOOD, (dev, rs[-1].error)
        assert now_s - rs[-1].ts_s <= 3 * PERIOD_S, dev  # fresh: within its stale limit
        gaps = [b.ts_s - a.ts_s for a, b in itertools.pairwise(rs[1:])]
        assert max(gaps) <= 3 * PERIOD_S, (dev, max(gaps))
        assert all(r.quality is Quality.GOOD for r in rs), dev


FAULT_CASES = {
    # per request; a rectifier poll is 5 requests, so 5 x 15 ms stays inside the 100 ms timeout
    "delay": (Fault(FaultKind.DELAY, delay_s=0.015), "shelf-2"),
    "timeout": (Fault(FaultKind.TIMEOUT), "shelf-2"),
    "exception": (Fault(FaultKind.EXCEPTION, exception_code=6), "shelf-2"),
    "garbage": (Fault(FaultKind.GARBAGE), "shelf-2"),
    "gone-behind-gateway": (Fault(FaultKind.GONE), "shelf-2"),
    "gone-own-port": (Fault(FaultKind.GONE), "sst-1"),
}


@pytest.mark.parametrize("case", sorted(FAULT_CASES))
async def test_a_fault_stays_with_its_device(
    case: str, gateway: tuple[ModbusFrontend, StaticSource, FaultTable]
) -> None:
    fe, src, faults = gateway
    fault, victim = FAULT_CASES[case]
    faults.set(victim, fault)
    devices = build_modbus_devices(device_params(fe))
    store = Store()
    loop = asyncio.get_running_loop()
    async with PollGroup(store) as group:
        for d in devices:
            group.add(
                d, PollSettings(PERIOD_S, TIMEOUT_S, backoff_initial_s=0.1, backoff_max_s=0.4)
            )
        await asyncio.sleep(8 * PERIOD_S)
        now_s = loop.time()
        stats = group.stats()
        healthy = [d.name for d in devices if d.name != victim]
        assert_fresh_and_on_time(store, healthy, now_s)
        bad = latest(store, victim)
        s = stats[victim]
        if case == "delay":
            assert bad.quality is Quality.GOOD  # late, but within the timeout
            # 5 requests x 15 ms
            assert s.last_poll_duration_s is not None and s.last_poll_duration_s >= 0.05
        elif case == "timeout":
            assert bad.quality is Quality.ERROR and "timeout" in (bad.error or "").lower()
            assert s.timeouts >= 2 and s.last_good_s is None
        elif case == "exception":
            assert bad.quality is Quality.ERROR
            assert "0x06 (server device busy)" in (bad.error or "")
        elif case == "garbage":
            assert bad.quality is Quality.BAD and "nan" in (bad.error or "")
            assert latest(store, victim, "module_count").quality is Quality.BAD
        elif case == "gone-behind-gateway":
            assert bad.quality is Quality.ERROR and "0x0B" in (bad.error or "")
        else:
            assert bad.quality is Quality.ERROR
            assert "connect" in (bad.error or "").lower()
        if case != "delay":
            assert s.errors >= 2 and s.last_error
        if case not in ("delay", "garbage"):  # garbage still has plausible alarm words
            assert s.consecutive_failures >= 1
        # Clear the fault: the device comes back by itself (reconnecting if it must).
        faults.set(victim, None)
        await asyncio.sleep(10 * PERIOD_S)
        back = latest(store, victim)
        assert back.quality is Quality.GOOD, back.error
        assert back.value == src.values[(victim, "output_power_w")]
    for d in devices:
        assert not d.conn.connected


# --- writes ---------------------------------------------------------------------------------


async def test_writes_only_to_writable_points_inside_their_range(
    gateway: tuple[ModbusFrontend, StaticSource, FaultTable],
) -> None:
    fe, src, _ = gateway
    [shelf] = build_modbus_devices([params(fe, "shelf-2", RECT)])
    await shelf.connect()
    try:
        await shelf.write_point("current_limit_a", 1234.5)
        assert src.values[("shelf-2", "current_limit_a")] == 1234.5
        assert (await shelf.read_point("current_limit_a")).value == 1234.5
        with pytest.raises(WriteRejected, match="outside"):
            await shelf.write_point("current_limit_a", 6000.1)
        with pytest.raises(WriteRejected, match="not writable"):
            await shelf.write_point("output_power_w", 1.0)
        with pytest.raises(WriteRejected, match="no point"):
            await shelf.write_point("nonsense", 1.0)
        assert src.values[("shelf-2", "current_limit_a")] == 1234.5
        await shelf.write_point("output_enabled", 0)
        assert src.values[("shelf-2", "output_enabled")] == 0.0
        power = await shelf.read_power_w()
        assert power.point == "output_power_w" and power.value == 200_000.0
    finally:
        await shelf.close()


async def test_server_rejects_out_of_range_writes_from_other_masters(
    gateway: tuple[ModbusFrontend, StaticSource, FaultTable],
) -> None:
    fe, src, _ = gateway
    ep = fe.endpoint("sst-1")
    before = src.values[("sst-1", "dc_voltage_setpoint_v")]
    async with AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1) as c:
        rr = await c.write_register(50, 9000, device_id=ep.unit_id)  # 900.0 V > max 850
        assert rr.isError() and rr.exception_code == 3
        rr = await c.write_register(50, 8000, device_id=ep.unit_id)
        assert not rr.isError()
    assert before != 800.0 and src.values[("sst-1", "dc_voltage_setpoint_v")] == 800.0


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_modbus_over_tls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(cert), str(key))
    src = StaticSource({("shelf-1", "output_power_w"): 4242.0})
    async with ModbusFrontend([SimModbusDevice("shelf-1", RECT)], src, sslctx=sctx) as fe:
        ep = fe.endpoint("shelf-1")
        p = DeviceParams(
            "shelf-1",
            "modbus",
            host=ep.host,
            port=ep.port,
            map_name=RECT,
            period_s=1.0,
            timeout_s=0.5,
            options={"tls": True, "tls_cafile": str(cert)},
        )
        [dev] = build_modbus_devices([p])
        await dev.connect()
        try:
            assert "tls://" in dev.conn.endpoint
            assert (await dev.read_power_w()).value == 4242.0
        finally:
            await dev.close()
        # Without the CA the handshake fails: the driver reports it, it does not hang.
        [untrusted] = build_modbus_devices(
            [
                DeviceParams(
                    "shelf-1",
                    "modbus",
                    host=ep.host,
                    port=ep.port,
                    map_name=RECT,
                    options={"tls": True},
                )
            ]
        )
        with pytest.raises(Exception, match="connect"):
            await untrusted.connect()
        await untrusted.close()
