"""PlantSource: the plant's values as the simulated hardware serves them.

Values are checked through the real device maps (encoded as the frontends do, decoded
as the drivers do), so a wrong unit or scale shows up here and not on the wire.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from controller.model.config import Site
from controller.model.loader import load_site, parse_site
from controller.model.topology import PowerTree
from drivers import codec
from drivers.datatypes import ENTITY_SCALE_UNITS
from drivers.devicemap import ModbusMap, ModbusPoint, SnmpMap, SnmpPoint, load_map
from sim.fake_nvml import FakeNvml
from sim.faults import Fault, FaultKind
from sim.plant import Plant, PlantState, Setpoints
from sim.plant_source import PlantSource
from sim.runtime import SimRuntime
from tests.sites import ab_site

DEMO = "configs/sites/demo.yaml"


def every_map_site() -> dict[str, Any]:
    """The A/B tiny site with a device of every shipped map metering some node."""
    site = ab_site()
    snmp = {"driver": "snmp", "address": "127.0.0.1:16161"}
    site["devices"] = [
        {
            "id": "sst-meter",
            "driver": "modbus",
            "address": "127.0.0.1:15020",
            "map": "generic-sst-mv800",
        },
        {
            "id": "shelf",
            "driver": "modbus",
            "address": "127.0.0.1:15021",
            "unit_id": 1,
            "map": "generic-hvdc-rectifier-800v",
        },
        {
            "id": "psu",
            "driver": "modbus",
            "address": "127.0.0.1:15021",
            "unit_id": 2,
            "map": "ocp-orv3-psu",
        },
        {
            "id": "dcdc",
            "driver": "modbus",
            "address": "127.0.0.1:15021",
            "unit_id": 3,
            "map": "sunspec-714",
        },
        {"id": "feed-a-meter", **snmp, "community": "a", "map": "ietf-entity-sensor"},
        {"id": "feed-b-meter", **snmp, "community": "b", "map": "ietf-entity-sensor"},
        {"id": "pdu-1", **snmp, "community": "p1", "map": "apc-rpdu2"},
        {"id": "pdu-2", **snmp, "community": "p2", "map": "raritan-pdu2"},
        {"id": "ups", **snmp, "community": "u", "map": "ietf-ups-mib"},
    ]
    feed = site["feeds"][0]
    feed["sources"][0]["meters"] = [{"device": "feed-a-meter", "point": "power_w"}]
    feed["sources"][1]["meters"] = [{"device": "feed-b-meter", "point": "power_w"}]
    site["ssts"][0]["meters"] = [{"device": "sst-meter", "point": "input_power_w"}]
    site["buses"][0]["meters"] = [{"device": "sst-meter", "point": "output_power_w"}]
    row = site["rows"][0]
    row["meters"] = [{"device": "shelf", "point": "input_power_w"}]
    rack = row["racks"][0]
    rack["meters"] = [{"device": "pdu-{rack_i}"}]
    rack["nodes"][0]["meters"] = [{"device": "psu", "point": "input_power_w"}]
    # Node-level meters on rack 1 only; rack 2's nodes through the UPS and the DC converter.
    row["racks"] = [
        {
            **rack,
            "id": "rack-1",
            "count": None,
            "nodes": [
                {
                    **rack["nodes"][0],
                    "id": "rack-1-n{i}",
                    "count": 1,
                    "meters": [{"device": "psu", "point": "input_power_w"}],
                },
                {
                    **rack["nodes"][0],
                    "id": "rack-1-x",
                    "count": None,
                    "meters": [{"device": "dcdc", "point": "power_w"}],
                },
            ],
            "meters": [{"device": "pdu-1"}],
        },
        {
            **rack,
            "id": "rack-2",
            "count": None,
            "nodes": [{**rack["nodes"][0], "id": "rack-2-n{i}", "count": 2, "meters": []}],
            "meters": [{"device": "pdu-2"}, {"device": "ups", "point": "output_power_w"}],
        },
    ]
    for r in row["racks"]:
        if r["count"] is None:
            del r["count"]
        for n in r["nodes"]:
            if n.get("count") is None:
                n.pop("count", None)
    return site


def run(
    plant: Plant,
    source: PlantSource,
    demand_w: float,
    steps: int = 30,
    lost: frozenset[str] = frozenset(),
) -> PlantState:
    state = source.state
    demand = np.full(plant.n_gpus, demand_w)
    for _ in range(steps):
        state = plant.step(state, Setpoints(demand, lost_sources=lost), 0.1)
        source.update(state)
    return state


def build(site: Site) -> tuple[Plant, PlantSource]:
    plant = Plant(PowerTree(site))
    return plant, PlantSource(site, plant)


@pytest.fixture(scope="module")
def demo() -> Site:
    return load_site(DEMO)


@pytest.fixture(scope="module")
def many() -> Site:
    return parse_site(every_map_site(), "every-map")


def through_map(
    dmap: ModbusMap | SnmpMap, name: str, value: float, served: dict[str, float | None]
) -> float:
    """Encode ``value`` as the frontend does, decode as the driver does."""
    point = dmap.points[name]
    if isinstance(point, ModbusPoint):
        sf = 0
        if point.scale_point is not None:
            sf = int(served.get(point.scale_point) or dmap.points[point.scale_point].sim_value or 0)
        decoded = codec.decode(point, codec.encode(point, value, sf), sf)
        assert isinstance(decoded, float)
        assert codec.problem(point, decoded) is None, (name, value, decoded)
        return decoded
    assert isinstance(point, SnmpPoint)

    def meta(oid: str | None, default: int) -> int:
        assert isinstance(dmap, SnmpMap)
        if oid is None:
            return default
        ref = dmap.by_oid()[oid.lstrip(".")]
        v = served.get(ref)
        return round(v if v is not None else dmap.points[ref].sim_value or default)

    digits = meta(point.divisor_oid, 0)
    si = meta(point.si_scale_oid, ENTITY_SCALE_UNITS)
    raw = codec.snmp_encode(point, value, digits, si)
    decoded_snmp = codec.snmp_decode(point, raw, digits, si)
    assert isinstance(decoded_snmp, float)
    assert codec.problem(point, decoded_snmp, raw) is None, (name, value, raw)
    return decoded_snmp


def resolution(dmap: ModbusMap | SnmpMap, name: str) -> float:
    point = dmap.points[name]
    if isinstance(point, SnmpPoint):
        return abs(point.scale)
    return 0.0 if point.type.startswith("float") else abs(point.scale) * 10  # SunSpec sf 1


def test_meters_serve_node_input_power_through_the_maps(demo: Site) -> None:
    plant, source = build(demo)
    state = run(plant, source, 600.0)
    powers = plant.node_power(state)
    checked = 0
    for node in demo.nodes:
        for m in node.meters:
            dmap = load_map(next(d.map for d in demo.devices if d.id == m.device) or "")
            served = source.points(m.device)
            value = source.value(m.device, m.point)
            assert value is not None
            assert value == pytest.approx(powers[node.id], rel=1e-12)
            decoded = through_map(dmap, m.point, value, served)
            tolerance = resolution(dmap, m.point)
            assert decoded == pytest.approx(powers[node.id], rel=1e-6, abs=tolerance)
            checked += 1
    assert checked == 1 + 1 + 1 + 2 + 8  # feed, sst, bus, rows, racks


def test_sst_output_point_is_the_sst_nodes_output(demo: Site) -> None:
    plant, source = build(demo)
    state = run(plant, source, 650.0)
    sst = plant.node_index["sst-1"]
    assert source.value("sst-1-meter", "output_power_w") == pytest.approx(
        float(state.node_output_w[sst])
    )
    # The bus meters the SST output: the bus's input equals it (a bus converts nothing).
    assert plant.power_w(state, "bus-800v") == pytest.approx(float(state.node_output_w[sst]))
    assert source.value("sst-1-meter", "input_power_w") == pytest.approx(
        plant.power_w(state, "sst-1")
    )


def test_feed_source_meters_serve_each_sides_share(many: Site) -> None:
    plant, source = build(many)
    state = run(plant, source, 400.0)
    a, b = (float(state.source_power_w[plant.source_index[s]]) for s in ("feed-a", "feed-b"))
    assert a > 0 and b > 0
    assert source.value("feed-a-meter", "power_w") == pytest.approx(a)
    assert a + b == pytest.approx(plant.power_w(state, "feed"))
    state = run(plant, source, 400.0, lost=frozenset({"feed-a"}))
    assert source.value("feed-a-meter", "power_w") == 0.0
    assert source.value("feed-b-meter", "power_w") == pytest.approx(plant.power_w(state, "feed"))


def test_every_point_of_every_map_decodes_as_good(many: Site) -> None:
    """Whatever is derived, the driver's own validation must accept it (no BAD quality)."""
    plant, source = build(many)
    run(plant, source, 450.0)
    served_points = 0
    for dev in many.devices:
        dmap = load_map(dev.map or "")
        served = source.points(dev.id)
        for name, value in served.items():
            if value is None:
                continue
            assert math.isfinite(value), (dev.id, name)
            through_map(dmap, name, value, served)
            served_points += 1
    assert served_points > 80


def test_derived_values_are_coherent(demo: Site) -> None:
    plant, source = build(demo)
    run(plant, source, 600.0)
    shelf = source.points("shelf-row-1")
    p_in = shelf["input_power_w"]
    p_out = shelf["output_power_w"]
    assert p_in is not None and p_out is not None and 0 < p_out < p_in
    assert shelf["efficiency_pct"] == pytest.approx(p_out / p_in * 100)
    phases = 0.0
    for k in (1, 2, 3):
        v, i, p = (
            shelf[f"input_{q}_l{k}_{u}"]
            for q, u in (("voltage", "v"), ("current", "a"), ("power", "w"))
        )
        assert v is not None and i is not None and p is not None
        assert 200 < v < 260  # phase voltage of a 400/415 V supply
        assert i * v == pytest.approx(p)
        phases += p
    assert phases == pytest.approx(p_in)
    v_out, i_out = shelf["output_voltage_v"], shelf["output_current_a"]
    assert v_out == 800.0 and i_out is not None
    assert i_out * v_out == pytest.approx(p_out)
    modules = [v for k, v in shelf.items() if k.startswith("module_") and k.endswith("_a")]
    assert shelf["module_count"] == len(modules) == 12 == shelf["modules_online"]
    assert sum(m or 0.0 for m in modules) == pytest.approx(i_out)
    assert shelf["status_word"] == 0 and shelf["alarm_word_1"] == 0 and shelf["alarm_word_2"] == 0

    sst = source.points("sst-1-meter")
    assert sst["mv_input_voltage_v"] == 13_800.0
    assert sst["dc_output_voltage_v"] == 800.0
    assert (sst["dc_output_current_a"] or 0) * 800.0 == pytest.approx(sst["output_power_w"])
    mv_i = sst["mv_input_current_a"] or 0.0
    assert math.sqrt(3) * 13_800 * mv_i == pytest.approx(sst["input_power_w"])

    pdu = source.points("pdu-row-1-rack-1")
    assert (pdu["phase_1_current_a"] or 0) * (pdu["phase_1_voltage_v"] or 0) == pytest.approx(
        pdu["power_w"]
    )


def test_temperatures_rise_with_load_and_energy_integrates(demo: Site) -> None:
    plant, source = build(demo)
    run(plant, source, 150.0)
    cool = source.points("shelf-row-1")
    e0 = source.value("sst-1-meter", "input_energy_wh") or 0.0
    p_sst = source.value("sst-1-meter", "input_power_w") or 0.0
    state = run(plant, source, 700.0, steps=50)  # power settles within a step or two
    hot = source.points("shelf-row-1")
    for name in ("outlet_temp_c", "hotspot_temp_c", "inlet_temp_c"):
        assert (hot[name] or 0) > (cool[name] or 0), name
    p_now = source.value("sst-1-meter", "input_power_w") or 0.0
    e1 = source.value("sst-1-meter", "input_energy_wh") or 0.0
    assert p_sst < (e1 - e0) * 3600 / 5.0 <= p_now * 1.001  # 5 s between the two
    kwh = source.value("sst-1-meter", "output_energy_kwh") or 0.0
    sst = plant.node_index["sst-1"]
    assert kwh > 0 and kwh * 3.6e6 < (e1 * 3600)  # output energy below input energy
    assert state.node_output_w[sst] < state.node_power_w[sst]


def test_alarm_and_status_words_follow_plant_trips(demo: Site) -> None:
    plant, source = build(demo)
    state = run(plant, source, 500.0)
    row = plant.node_index["row-1"]
    tripped = state.tripped.copy()
    tripped[row] = True
    source.update(dataclasses.replace(state, tripped=tripped))
    shelf = source.points("shelf-row-1")
    assert int(shelf["alarm_word_2"] or 0) & (1 << 5)  # breaker_open
    assert int(shelf["status_word"] or 0) & (1 << 15)  # fault
    assert shelf["modules_online"] == 0
    assert source.value("shelf-row-2", "alarm_word_2") == 0  # the other row is fine

    dark = state.dark_node.copy()
    dark[row] = True
    source.update(dataclasses.replace(state, dark_node=dark))
    shelf = source.points("shelf-row-1")
    assert int(shelf["alarm_word_1"] or 0) & 1  # ac_fail
    assert shelf["ac_ok"] == 0
    assert source.value("shelf-row-2", "ac_ok") == 1


def test_gpu_points_and_limit_writes(demo: Site) -> None:
    plant, source = build(demo)
    state = run(plant, source, 550.0)
    gid = plant.tree.gpus[9].id
    assert source.value(gid, "power_w") == float(state.gpu_power_w[9])
    assert source.value(gid, "power_avg_w") == float(state.gpu_power_1s_w[9])
    assert (source.value(gid, "energy_j") or 0) > 0
    gen, limits = source.take_limits(0)
    assert limits is None and gen == 0
    assert source.write(gid, "limit_w", 420.0)
    assert not source.write("no-such-gpu", "limit_w", 420.0)
    gen, limits = source.take_limits(0)
    assert gen == 1 and limits is not None and limits[9] == 420.0 and limits[8] == 700.0
    assert source.take_limits(gen) == (gen, None)


def test_writable_modbus_points_hold_what_is_written(demo: Site) -> None:
    _, source = build(demo)
    assert source.value("shelf-row-1", "current_limit_a") == pytest.approx(110_000 / 800)
    assert source.write("shelf-row-1", "current_limit_a", 120.0)
    assert source.value("shelf-row-1", "current_limit_a") == 120.0
    assert not source.write("shelf-row-1", "input_power_w", 1.0)  # a measurement
    assert source.value("shelf-row-2", "current_limit_a") == pytest.approx(110_000 / 800)


def test_fake_nvml_limit_reaches_the_plant(demo: Site) -> None:
    """The fake NVML (pynvml's interface, no GPU here) sets a limit; the plant obeys it
    after its own actuation delay, and NVML reads the plant's power back."""
    sim = SimRuntime(demo, seed=3, workloads=[])
    sim.load_step(8.0)  # idle demand x8: above any limit, so power follows the limit
    nvml: FakeNvml = sim.fake_nvml("row-2-rack-3-node-2")
    assert sim.fake_nvml("row-2-rack-3-node-2") is nvml
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 8
    handle = nvml.nvmlDeviceGetHandleByIndex(5)
    nvml.nvmlDeviceSetPowerManagementLimit(handle, 300_000)
    sim.step(20)
    g = sim.tree.gpu_index["row-2-rack-3-node-2-g5"]
    assert sim.state.gpu_limit_w[g] == pytest.approx(300.0)
    assert sim.state.gpu_power_w[g] == pytest.approx(300.0, rel=1e-3)
    assert nvml.nvmlDeviceGetPowerUsage(handle) == round(sim.state.gpu_power_1s_w[g] * 1000)
    assert sim.state.gpu_limit_w[g - 1] == pytest.approx(700.0)
    with pytest.raises(KeyError):
        sim.fake_nvml("row-2-rack-3")


# -- the runtime around it (stepped by hand: no sockets, no clock) ----------------------


def test_default_workloads_fill_most_gpus_and_overload_racks(demo: Site) -> None:
    sim = SimRuntime(demo, seed=11)
    sim.step(600)  # a minute: past the jobs' warm-up
    jobs = sim.scheduler.jobs()
    busy = sum(len(j.gpus) for j in jobs)
    assert busy >= 0.8 * len(sim.tree.gpus)
    classes = {j.priority_class for j in jobs}
    assert {"critical", "training", "batch", "inference"} <= classes
    assert any(not j.synchronous for j in jobs)  # the inference service
    racks = [sim.plant.power_w(sim.state, r) for r in sim.tree.of_kind("rack")]
    assert max(racks) > 23_400  # above the envelope: there is something to control
    # Seeded: the same seed gives the same plant, another seed another.
    again = SimRuntime(demo, seed=11)
    again.step(600)
    assert again.state.feed_power_w == sim.state.feed_power_w
    other = SimRuntime(demo, seed=12)
    other.step(600)
    assert other.state.feed_power_w != sim.state.feed_power_w


def test_runtime_actions_reach_the_plant(many: Site) -> None:
    sim = SimRuntime(many, seed=1, workloads=[])
    sim.step(10)
    assert (sim.value("feed-a-meter", "power_w") or 0) > 0
    sim.lose_source("feed-a")
    sim.step(3)
    assert sim.value("feed-a-meter", "power_w") == 0.0
    assert sim.value("feed-b-meter", "power_w") == pytest.approx(
        sim.plant.power_w(sim.state, "feed")
    )
    sim.restore_source("feed-a")
    sim.step(3)
    assert (sim.value("feed-a-meter", "power_w") or 0) > 0
    with pytest.raises(KeyError):
        sim.lose_source("feed-c")

    idle = sim.plant.power_w(sim.state, "rack-2")
    sim.load_step(5.0)
    sim.step(5)
    assert sim.plant.power_w(sim.state, "rack-2") > 2 * idle
    with pytest.raises(ValueError):
        sim.load_step(float("nan"))

    sim.set_fault("pdu-1", Fault(FaultKind.TIMEOUT))
    sim.set_fault(sim.tree.gpus[0].id, Fault(FaultKind.GONE))
    assert set(sim.faults.active()) == {"pdu-1", sim.tree.gpus[0].id}
    sim.set_fault("pdu-1", None)
    assert set(sim.faults.active()) == {sim.tree.gpus[0].id}
    with pytest.raises(KeyError):
        sim.set_fault("no-such-device", Fault(FaultKind.TIMEOUT))


def test_reclose_resets_a_tripped_breaker(demo: Site) -> None:
    sim = SimRuntime(demo, seed=1, workloads=[])
    row = sim.plant.element_index["row-1"]
    tripped = sim.state.tripped.copy()
    tripped[row] = True
    sim._state = dataclasses.replace(sim.state, tripped=tripped)  # as a trip leaves it
    assert sim.reclose() == ["row-1"]
    assert not sim.plant.tripped_ids(sim.state)
    assert sim.reclose() == []
