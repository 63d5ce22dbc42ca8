"""SNMP end to end on loopback: net-snmp's tools read our simulated agent, our driver reads
a real snmpd (v2c and v3 authPriv SHA-256/AES) and the simulated agent for every SNMP
device map, over both transports, and faults on one device leave the others polled."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from drivers import snmpwire as w
from drivers.base import DeviceParams, PollGroup, PollSettings
from drivers.codec import snmp_decode, snmp_encode
from drivers.datatypes import ENTITY_SCALE_UNITS
from drivers.devicemap import SnmpMap, available_maps, load_map, load_snmp_map
from drivers.reading import Quality, Reading
from drivers.snmp import (
    FastV2cTransport,
    PysnmpTransport,
    SnmpDevice,
    build_snmp_devices,
)
from sim.faults import Fault, FaultKind, FaultTable
from sim.snmp_agent import SnmpFrontend, SnmpResponder, SnmpSimDevice
from sim.values import StaticSource
from tests.fixtures.snmpd import (
    QUIET_ENV,
    V3_AUTH_KEY,
    V3_PRIV_KEY,
    V3_USER,
    Override,
    Snmpd,
)
from tests.helpers.tools import require_tool

pytest_plugins = ["tests.fixtures.snmpd"]

# Every SNMP map shipped (apc-rpdu2, raritan-pdu2, ietf-ups-mib, ietf-entity-sensor...).
SNMP_MAPS = sorted(n for n, _ in available_maps() if isinstance(load_map(n), SnmpMap))


# ---------------------------------------------------------------------------
# helpers


def plant_values(device_id: str, smap: SnmpMap, seed: int = 1) -> dict[tuple[str, str], float]:
    """A value inside [min, max] for every point the plant would provide (not constants)."""
    rng = random.Random(seed)
    out = {}
    for name, p in smap.points.items():
        if p.sim_value is not None:
            continue
        lo = p.min if p.min is not None else 0.0
        hi = p.max if p.max is not None else lo + 1e6
        out[(device_id, name)] = round(lo + (hi - lo) * rng.uniform(0.1, 0.9), 3)
    return out


def served_then_decoded(smap: SnmpMap, name: str, value: float) -> float:
    """What a perfect driver reads back for ``value``: the map's resolution applied."""
    p = smap.points[name]

    def const(oid: str | None, default: int) -> int:
        if oid is None:
            return default
        ref = smap.points[smap.by_oid()[oid.lstrip(".")]]
        assert ref.sim_value is not None
        return round(ref.sim_value)

    digits = const(p.divisor_oid, 0)
    si = const(p.si_scale_oid, ENTITY_SCALE_UNITS)
    return snmp_decode(p, snmp_encode(p, value, digits, si), digits, si)


def by_point(readings: Sequence[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


async def read_once(device: SnmpDevice) -> dict[str, Reading]:
    await device.connect()
    return by_point(await device.read())


def params(
    device_id: str,
    map_name: str,
    port: int,
    *,
    transport: str = "auto",
    community: str = "",
    **kw: object,
) -> DeviceParams:
    opts: dict[str, object] = {"transport": transport, "community": community or device_id}
    opts.update({k: v for k, v in kw.items() if k in ("tables", "retries", "max_varbinds")})
    other = {k: v for k, v in kw.items() if k not in opts}
    return DeviceParams(
        device_id,
        "snmp",
        host="127.0.0.1",
        port=port,
        map_name=map_name,
        options=opts,
        **other,  # type: ignore[arg-type]
    )


async def run_tool(*args: str) -> str:
    """A net-snmp command, run without blocking the loop the simulated agent lives on."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=QUIET_ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def parse_numeric(output: str) -> dict[str, str]:
    """``-Oqn`` lines: ``.1.3.6.1.... value`` -> {oid without dot: value}."""
    out = {}
    for line in output.splitlines():
        oid, _, value = line.partition(" ")
        out[oid.lstrip(".")] = value.strip().strip('"')
    return out


# ---------------------------------------------------------------------------
# real tools read the simulated agent


@pytest.fixture
async def pdus() -> AsyncIterator[tuple[SnmpFrontend, StaticSource]]:
    apc, rar = load_snmp_map("apc-rpdu2"), load_snmp_map("raritan-pdu2")
    source = StaticSource({**plant_values("pdu-a", apc), **plant_values("pdu-b", rar)})
    source.values[("pdu-a", "power_w")] = 4321.0
    source.values[("pdu-b", "current_a")] = 5.432
    fe = SnmpFrontend(
        [SnmpSimDevice("pdu-a", apc, "comm-a"), SnmpSimDevice("pdu-b", rar, "comm-b")], source
    )
    await fe.start()
    yield fe, source
    await fe.stop()


async def test_snmpget_reads_the_simulated_pdu(pdus: tuple[SnmpFrontend, StaticSource]) -> None:
    fe, source = pdus
    snmpget = require_tool("snmpget", "snmp")
    apc = load_snmp_map("apc-rpdu2")
    oids = [apc.points[n].full_oid for n in ("power_w", "phase_1_current_a", "load_state")]
    out = parse_numeric(
        await run_tool(snmpget, "-v2c", "-c", "comm-a", "-Oqn", f"127.0.0.1:{fe.port}", *oids)
    )
    # rPDU2DeviceStatusPower is in hundredths of kW: 4321 W -> 432
    assert out[oids[0]] == "432"
    assert out[oids[1]] == str(round(source.values[("pdu-a", "phase_1_current_a")] * 10))
    assert out[oids[2]] == "2"  # load_state: the map's constant (normal)
    # The value is live: the plant moves, the next GET sees it.
    source.values[("pdu-a", "power_w")] = 5000.0
    out = parse_numeric(
        await run_tool(snmpget, "-v2c", "-c", "comm-a", "-Oqn", f"127.0.0.1:{fe.port}", oids[0])
    )
    assert out[oids[0]] == "500"


async def test_snmpbulkwalk_walks_the_simulated_pdu(
    pdus: tuple[SnmpFrontend, StaticSource],
) -> None:
    """Every Raritan point comes back, in OID order, with the digits the map serves."""
    fe, _source = pdus
    walk = require_tool("snmpbulkwalk", "snmp")
    rar = load_snmp_map("raritan-pdu2")
    out = await run_tool(
        walk, "-v2c", "-c", "comm-b", "-Oqn", "-Cr7", f"127.0.0.1:{fe.port}", ".1.3.6.1.4.1.13742"
    )
    got = parse_numeric(out)
    expected_order = sorted(w.parse_oid(p.full_oid) for p in rar.points.values())
    assert [w.parse_oid(o) for o in got] == expected_order
    current = rar.points["current_a"]
    assert got[current.full_oid] == "5432"  # 5.432 A with 3 decimal digits
    assert got[rar.points["current_digits"].full_oid] == "3"
    # the other community's device is not visible here
    assert not any(o.startswith("1.3.6.1.4.1.318") for o in got)


async def test_unknown_community_gets_no_answer(pdus: tuple[SnmpFrontend, StaticSource]) -> None:
    fe, _ = pdus
    snmpget = require_tool("snmpget", "snmp")
    proc = await asyncio.create_subprocess_exec(
        snmpget,
        "-v2c",
        "-c",
        "nobody",
        "-t",
        "0.3",
        "-r",
        "0",
        f"127.0.0.1:{fe.port}",
        ".1.3.6.1.2.1.1.3.0",
        env=QUIET_ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0
    assert b"Timeout" in err


# ---------------------------------------------------------------------------
# our driver reads a real snmpd

APC = "1.3.6.1.4.1.318.1.1.26"
RAR_VALUE = "1.3.6.1.4.1.13742.6.5.2.3.1.4.1.1"
RAR_DIGITS = "1.3.6.1.4.1.13742.6.3.3.4.1.7.1.1"
ENT = "1.3.6.1.2.1.99.1.1.1"

SNMPD_VALUES = [
    Override(f"{APC}.4.3.1.5.1", "integer", 432),  # 4.32 kW
    Override(f"{APC}.4.3.1.6.1", "integer", 510),
    Override(f"{APC}.4.3.1.9.1", "integer", 12345),  # 1234.5 kWh
    Override(f"{APC}.4.3.1.4.1", "integer", 2),
    Override(f"{APC}.6.3.1.5.1", "integer", 187),  # 18.7 A
    Override(f"{APC}.6.3.1.6.1", "integer", 230),
    Override(f"{APC}.6.3.1.7.1", "integer", -1),  # "not implemented" on this model
    Override(f"{RAR_VALUE}.5", "uinteger", 12345),
    Override(f"{RAR_DIGITS}.5", "uinteger", 1),  # -> 1234.5 W
    Override(f"{RAR_VALUE}.1", "uinteger", 5432),
    Override(f"{RAR_DIGITS}.1", "uinteger", 3),  # -> 5.432 A
    Override(f"{ENT}.4.1", "integer", 123),
    Override(f"{ENT}.2.1", "integer", 10),  # kilo
    Override(f"{ENT}.3.1", "integer", 1),  # one decimal: 12.3 kW
]


def check_snmpd_values(
    apc: dict[str, Reading], rar: dict[str, Reading], ent: dict[str, Reading]
) -> None:
    assert apc["power_w"].value == pytest.approx(4320.0)
    assert apc["power_w"].quality is Quality.GOOD
    assert apc["power_w"].unit == "W"
    assert apc["energy_j"].value == pytest.approx(12345 * 360000.0)
    assert apc["phase_1_current_a"].value == pytest.approx(18.7)
    assert apc["phase_1_voltage_v"].value == 230.0
    assert apc["phase_1_power_w"].quality is Quality.BAD
    assert "not implemented" in (apc["phase_1_power_w"].error or "")
    assert rar["power_w"].value == pytest.approx(1234.5)
    assert rar["current_a"].value == pytest.approx(5.432)
    assert rar["power_w"].quality is rar["current_a"].quality is Quality.GOOD
    # not configured in snmpd: BAD, saying the agent does not have it
    assert rar["voltage_v"].quality is Quality.BAD
    assert "noSuch" in (rar["voltage_v"].error or "")
    assert ent["power_w"].value == pytest.approx(12300.0)
    assert ent["power_w"].quality is Quality.GOOD


@pytest.mark.parametrize("tables", ["bulk", "get"])
@pytest.mark.parametrize("transport", ["fast", "pysnmp"])
async def test_driver_reads_real_snmpd_v2c(
    snmpd_factory: Callable[[Sequence[Override]], Snmpd],
    transport: str,
    tables: str,
) -> None:
    server = snmpd_factory(SNMPD_VALUES)
    devices = build_snmp_devices(
        [
            params(
                f"{m}-1",
                m,
                server.port,
                transport=transport,
                community="public",
                tables=tables,
                timeout_s=0.9,
                period_s=1.0,
            )
            for m in ("apc-rpdu2", "raritan-pdu2", "ietf-entity-sensor")
        ]
    )
    try:
        apc, rar, ent = [await read_once(d) for d in devices]
    finally:
        for d in devices:
            await d.transport.close()
    check_snmpd_values(apc, rar, ent)


async def test_driver_reads_real_snmpd_v3_authpriv_sha256_aes(
    snmpd_factory: Callable[[Sequence[Override]], Snmpd],
) -> None:
    server = snmpd_factory(SNMPD_VALUES)
    pysnmp = PysnmpTransport()

    def v3(device_id: str, map_name: str, priv_key: str) -> DeviceParams:
        return DeviceParams(
            device_id,
            "snmp",
            port=server.port,
            map_name=map_name,
            options={
                "snmp_version": "3",
                "v3_user": V3_USER,
                "v3_auth_key": V3_AUTH_KEY,
                "v3_priv_key": priv_key,
                "v3_auth_protocol": "SHA-256",
                "v3_priv_protocol": "AES",
            },
            timeout_s=0.9,
            period_s=1.0,
        )

    devices = build_snmp_devices(
        [
            v3("apc", "apc-rpdu2", V3_PRIV_KEY),
            v3("rar", "raritan-pdu2", V3_PRIV_KEY),
            v3("ent", "ietf-entity-sensor", V3_PRIV_KEY),
        ],
        pysnmp=pysnmp,
    )
    assert all(d.transport is pysnmp for d in devices)  # v3 goes through pysnmp's USM
    try:
        apc, rar, ent = [await read_once(d) for d in devices]
        check_snmpd_values(apc, rar, ent)
        # A wrong privacy key: snmpd cannot decrypt, so no answer -> the read fails.
        (wrong,) = build_snmp_devices([v3("bad", "apc-rpdu2", "not-the-key")], pysnmp=pysnmp)
        await wrong.connect()
        with pytest.raises(Exception, match="SNMP"):
            await wrong.read()
    finally:
        await pysnmp.close()


# ---------------------------------------------------------------------------
# our driver reads the simulated agent, every SNMP map, both paths agree


@pytest.mark.parametrize("map_name", SNMP_MAPS)
async def test_driver_reads_every_map_from_the_sim_agent(map_name: str) -> None:
    smap = load_snmp_map(map_name)
    source = StaticSource(plant_values("dev", smap, seed=len(map_name)))
    async with SnmpFrontend([SnmpSimDevice("dev", smap, "c-dev")], source) as fe:
        results = {}
        for transport in ("fast", "pysnmp"):
            for tables in ("bulk", "get"):
                (device,) = build_snmp_devices(
                    [
                        params(
                            "dev",
                            map_name,
                            fe.port,
                            transport=transport,
                            community="c-dev",
                            tables=tables,
                        )
                    ]
                )
                try:
                    results[transport, tables] = await read_once(device)
                finally:
                    await device.transport.close()
    first = results["fast", "bulk"]
    assert set(first) == set(smap.points)
    for name, reading in first.items():
        assert reading.quality is Quality.GOOD, reading.error
        p = smap.points[name]
        expected = (
            p.sim_value
            if p.sim_value is not None
            else served_then_decoded(smap, name, source.values[("dev", name)])
        )
        assert reading.value == pytest.approx(expected, rel=1e-9, abs=1e-9), name
    for key, other in results.items():
        assert {n: r.value for n, r in other.items()} == {n: r.value for n, r in first.items()}, key


async def test_decimal_digits_are_cached_and_reread_after_a_restart() -> None:
    rar = load_snmp_map("raritan-pdu2")
    source = StaticSource(plant_values("rar", rar))
    source.values[("rar", "power_w")] = 1234.0
    async with SnmpFrontend([SnmpSimDevice("rar", rar, "c")], source) as fe:
        (device,) = build_snmp_devices([params("rar", "raritan-pdu2", fe.port, community="c")])
        try:
            first = await read_once(device)
            assert first["power_w"].value == 1234.0
            assert first["power_digits"].value == 0
            before = fe.responder.requests["rar"]
            second = by_point(await device.read())
            # digits not read again: one GET for sysUpTime and all the values
            assert fe.responder.requests["rar"] - before == 1
            assert "power_digits" not in second
            # The PDU is reconfigured to one decimal: raw 12340 now means 1234.0 W. Until
            # it restarts, the cached digits (0) make the driver read 12340 W...
            source.values[("rar", "power_digits")] = 1
            await asyncio.sleep(0.05)  # so sysUpTime has visibly advanced before the restart
            stale = by_point(await device.read())
            assert stale["power_w"].value == 12340.0
            # ...and after the agent restarts (sysUpTime goes back) it reads them again.
            fe.responder.restart("rar")
            fresh = by_point(await device.read())
            assert fresh["power_digits"].value == 1
            assert fresh["power_w"].value == 1234.0
            # a reconnect also re-reads them
            source.values[("rar", "power_digits")] = 2
            again = await read_once(device)
            assert again["power_w"].value == 1234.0
            assert again["power_digits"].value == 2
        finally:
            await device.transport.close()


async def test_many_points_are_split_over_several_gets() -> None:
    ups = load_snmp_map("ietf-ups-mib")
    source = StaticSource(plant_values("ups", ups))
    async with SnmpFrontend([SnmpSimDevice("ups", ups, "c")], source) as fe:
        (device,) = build_snmp_devices(
            [
                params(
                    "ups",
                    "ietf-ups-mib",
                    fe.port,
                    community="c",
                    tables="get",
                    max_varbinds=5,
                )
            ]
        )
        try:
            readings = await read_once(device)
        finally:
            await device.transport.close()
        assert fe.responder.requests["ups"] == math.ceil(len(ups.points) / 5)
    assert all(r.quality is Quality.GOOD for r in readings.values())
    assert len(readings) == len(ups.points)


# ---------------------------------------------------------------------------
# faults: the faulted device's points go bad, the others keep being polled


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def __call__(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)

    def of(self, device: str, since_s: float = 0.0) -> list[Reading]:
        return [r for r in self.readings if r.device == device and r.ts_s >= since_s]

    def good_polls(self, device: str, since_s: float) -> int:
        return len({r.ts_s for r in self.of(device, since_s) if r.quality is Quality.GOOD})


FAULT_CASES = {
    "timeout": (Fault(FaultKind.TIMEOUT), Quality.ERROR, "no SNMP answer"),
    "gone": (Fault(FaultKind.GONE), Quality.ERROR, "no SNMP answer"),
    "exception": (Fault(FaultKind.EXCEPTION), Quality.ERROR, "genErr"),
    "garbage": (Fault(FaultKind.GARBAGE), Quality.BAD, ""),
    "delay_beyond_timeout": (Fault(FaultKind.DELAY, delay_s=0.6), Quality.ERROR, "timeout"),
    "delay_within_timeout": (Fault(FaultKind.DELAY, delay_s=0.05), Quality.GOOD, ""),
}


@pytest.mark.parametrize("case", sorted(FAULT_CASES))
async def test_fault_on_one_device_leaves_the_others_fresh(case: str) -> None:
    fault, quality, message = FAULT_CASES[case]
    maps = {"apc": "apc-rpdu2", "rar": "raritan-pdu2", "ups": "ietf-ups-mib"}
    source = StaticSource()
    for dev, m in maps.items():
        source.values.update(plant_values(dev, load_snmp_map(m)))
    faults = FaultTable()
    devices = [SnmpSimDevice(d, load_snmp_map(m), f"c-{d}") for d, m in maps.items()]
    sink = Collector()
    async with SnmpFrontend(devices, source, faults) as fe:
        pollables = build_snmp_devices(
            [
                params(d, m, fe.port, community=f"c-{d}", period_s=0.4, timeout_s=0.3, retries=1)
                for d, m in maps.items()
            ]
        )
        try:
            async with PollGroup(sink) as group:
                for p in pollables:
                    group.add(p, PollSettings(period_s=0.4, timeout_s=0.3))
                await wait_until(lambda: all(sink.good_polls(d, 0) >= 1 for d in maps))
                faults.set("apc", fault)
                since = time.monotonic()
                # Bounded wait, no timed assertion: until the faulted device has shown the
                # fault twice and the healthy ones were polled fine three times meanwhile.
                await wait_until(
                    lambda: (
                        len({r.ts_s for r in sink.of("apc", since)}) >= 3
                        and all(sink.good_polls(d, since) >= 3 for d in ("rar", "ups"))
                    )
                )
                stats = group.stats()
        finally:
            await pollables[0].transport.close()
    faulted = [r for r in sink.of("apc", since)]
    latest = by_point(faulted[-len(load_snmp_map("apc-rpdu2").points) :])
    assert {r.quality for r in latest.values()} == {quality}, latest
    if quality is not Quality.GOOD:
        assert all(message in (r.error or "") for r in latest.values()), latest
        assert all(math.isnan(r.value) for r in latest.values()) or quality is Quality.BAD
        assert stats["apc"].errors > 0
    if case == "garbage":
        errors = " ".join(r.error or "" for r in latest.values())
        assert "above max" in errors or "below min" in errors
        assert "wrong type" in errors or "above max" in errors
    for healthy in ("rar", "ups"):
        assert sink.good_polls(healthy, since) >= 3
        assert stats[healthy].consecutive_failures == 0
        assert all(
            r.quality is Quality.GOOD
            for r in sink.of(healthy, since)
            if r.point in ("power_w", "output_power_w")
        )


async def wait_until(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached (bounded wait)"
        await asyncio.sleep(0.05)


def test_agent_survives_fuzzed_requests() -> None:
    """Corrupted requests to the agent: no exception, and every reply is valid SNMP."""
    apc = load_snmp_map("apc-rpdu2")
    agent = SnmpResponder([SnmpSimDevice("a", apc, "c")], StaticSource(plant_values("a", apc)))
    good = w.request(
        w.GETBULK, b"c", 99, [(1, 3, 6, 1, 4, 1, 318), (1, 3, 6, 1, 2, 1, 1, 3, 0)], 1, 8
    )
    rng = random.Random(7)
    replies = 0
    for _ in range(5000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        reply, _ = agent.handle(bytes(b))
        if reply is not None:
            replies += 1
            assert w.decode_message(reply).pdu_type == w.RESPONSE
    assert replies > 0


def test_fast_transport_is_shared() -> None:
    fast = FastV2cTransport()
    devices = build_snmp_devices([params(f"d{i}", "apc-rpdu2", 161) for i in range(3)], fast=fast)
    assert all(d.transport is fast for d in devices)
