"""Every shipped device map: loads, says where it comes from, has the points sites use,
round-trips every point through the codec (simulator encode -> driver decode), catches
garbage on its power points, and plans reads the protocol allows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from drivers import codec
from drivers.devicemap import (
    DEFAULT_MAP_DIR,
    ModbusMap,
    ModbusPoint,
    SnmpMap,
    SnmpPoint,
    load_map,
    load_map_file,
)
from drivers.modbus import MAX_REGISTERS, plan_blocks

MAP_FILES = sorted(DEFAULT_MAP_DIR.glob("*.yaml"))

REQUIRED_POINTS = {
    "generic-sst-mv800": [
        "input_power_w",
        "output_power_w",
        "mv_input_voltage_v",
        "mv_input_current_a",
        "dc_output_voltage_v",
        "dc_output_current_a",
        "efficiency_pct",
        "status_word",
        "alarm_word",
    ],
    "generic-hvdc-rectifier-800v": [
        "output_power_w",
        "output_voltage_v",
        "output_current_a",
        "input_voltage_l1_v",
        "input_current_l3_a",
        "input_power_l2_w",
        "efficiency_pct",
        "module_count",
        "module_12_current_a",
        "alarm_word_1",
        "current_limit_a",
    ],
    "ocp-orv3-psu": ["output_voltage_v", "output_current_a", "output_power_w", "input_power_w"],
    "sunspec-714": ["current_a", "power_w", "port_1_voltage_v", "dca_sf"],
    "apc-rpdu2": ["power_w", "energy_j", "phase_1_current_a"],
    "raritan-pdu2": ["power_w"],
    "ietf-ups-mib": ["output_power_w", "output_load_pct"],
    "ietf-entity-sensor": ["power_w"],
}


def sample_value(name: str, p: ModbusPoint | SnmpPoint) -> float | str:
    """A value the point can carry: its device constant, else inside [min, max]."""
    if isinstance(p, ModbusPoint):
        if p.type == "string":
            return "RP" * p.length
        if p.type == "bit":
            return 1.0
        if p.type == "bitfield":
            return float(sum(1 << b for b in p.bits))
    if p.sim_value is not None:
        return p.sim_value
    lo = p.min if p.min is not None else 0.0
    hi = p.max if p.max is not None else lo + 1000.0
    return lo + 0.37 * (hi - lo)


def resolution(p: ModbusPoint | SnmpPoint, sf: int, digits: int = 0, si: int = 9) -> float:
    if isinstance(p, SnmpPoint):
        return abs(codec.snmp_factor(p, digits, si))
    if p.type in ("float32", "float64"):
        return 0.0
    step = abs(p.scale) * 10.0**sf
    return step / (1 << p.fraction_bits) if p.type == "fixed" else step


def close_enough(got: float, want: float, step: float) -> bool:
    return abs(got - want) <= step / 2 + 1e-6 * abs(want) + 1e-9


@pytest.fixture(params=MAP_FILES, ids=[p.stem for p in MAP_FILES])
def map_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_there_is_a_map_for_every_model_the_issue_names() -> None:
    assert {p.stem for p in MAP_FILES} >= set(REQUIRED_POINTS)


def test_loads_by_name_and_names_its_source(map_file: Path) -> None:
    m = load_map_file(map_file)
    assert m.model == map_file.stem
    assert load_map(map_file.stem) == m
    assert len(m.source) > 20
    assert set(REQUIRED_POINTS.get(m.model, [])) <= set(m.points)


def test_power_points_have_a_range_that_catches_garbage(map_file: Path) -> None:
    m = load_map_file(map_file)
    for name, p in m.points.items():
        if not name.endswith("_w"):
            continue
        assert p.min is not None and p.max is not None, name
        if isinstance(p, ModbusPoint):
            raw = codec.decode_raw(p, codec.garbage(p))
            value = codec.decode(p, codec.garbage(p), 0)
        else:
            raw = codec.snmp_garbage(p)
            value = codec.snmp_decode(p, raw)
        assert not isinstance(value, str)
        assert codec.problem(p, value, raw) is not None, name


def _sf(m: ModbusMap, p: ModbusPoint) -> int:
    if p.scale_point is None:
        return 0
    v = sample_value(p.scale_point, m.points[p.scale_point])
    assert isinstance(v, float | int)
    return int(v)


def test_every_point_round_trips(map_file: Path) -> None:
    m = load_map_file(map_file)
    if isinstance(m, ModbusMap):
        for name, p in m.points.items():
            value = sample_value(name, p)
            sf = _sf(m, p)
            words = codec.encode(p, value, sf)  # what the simulator serves
            assert len(words) == p.registers
            got = codec.decode(p, words, sf)  # what the driver reads
            if isinstance(value, str):
                assert got == value, name
                continue
            assert not isinstance(got, str)
            assert close_enough(got, value, resolution(p, sf)), (name, got, value)
            assert codec.problem(p, got, codec.decode_raw(p, words)) is None, name
    else:
        assert isinstance(m, SnmpMap)
        by_oid = m.by_oid()

        def const(oid: str | None, default: int) -> int:
            if oid is None:
                return default
            ref = m.points[by_oid[oid.lstrip(".")]]
            assert ref.sim_value is not None, f"{oid} needs a sim_value"
            return int(ref.sim_value)

        for name, sp in m.points.items():
            value = sample_value(name, sp)
            assert isinstance(value, float | int)
            digits, si = const(sp.divisor_oid, 0), const(sp.si_scale_oid, 9)
            raw = codec.snmp_encode(sp, value, digits, si)  # what the agent serves
            got = codec.snmp_decode(sp, raw, digits, si)  # what the driver reads
            assert close_enough(got, value, resolution(sp, 0, digits, si)), (name, got, value)
            assert codec.problem(sp, got, raw) is None, name


MODBUS_FILES = [p for p in MAP_FILES if isinstance(load_map_file(p), ModbusMap)]


@pytest.mark.parametrize("path", MODBUS_FILES, ids=[p.stem for p in MODBUS_FILES])
def test_modbus_reads_fit_the_protocol(path: Path) -> None:
    m = load_map_file(path)
    assert isinstance(m, ModbusMap)
    points = m.numeric_points()
    blocks = plan_blocks(points)
    covered = [n for b in blocks for n in b.points]
    assert sorted(covered) == sorted(points)
    for b in blocks:
        assert 0 < b.count <= MAX_REGISTERS or b.table in ("coil", "discrete")
        for n in b.points:
            p = points[n]
            assert b.start <= p.address and p.address + p.registers <= b.start + b.count


def test_hole_limit_splits_blocks() -> None:
    pts = {
        "a": ModbusPoint(address=0, type="float32"),
        "b": ModbusPoint(address=6, type="uint16"),  # hole of 4
        "c": ModbusPoint(address=200, type="uint16"),  # far away
        "d": ModbusPoint(address=300, type="uint16", table="input"),
    }
    assert [(b.table, b.start, b.count) for b in plan_blocks(pts, max_hole=4)] == [
        ("holding", 0, 7),
        ("holding", 200, 1),
        ("input", 300, 1),
    ]
    assert [(b.start, b.count) for b in plan_blocks(pts, max_hole=3)][:2] == [(0, 2), (6, 1)]
    wide = {f"p{i}": ModbusPoint(address=i * 2, type="float32") for i in range(100)}
    assert [b.count for b in plan_blocks(wide)] == [124, 76]


def test_no_nan_sneaks_through_sample_values() -> None:
    for path in MAP_FILES:
        m = load_map_file(path)
        for name, p in m.points.items():
            v = sample_value(name, p)
            assert isinstance(v, str) or not math.isnan(v)
