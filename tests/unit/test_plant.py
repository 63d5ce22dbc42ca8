"""Plant physics: energy balance, breaker trip times, actuation delay, redundant feeds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from sim.plant import DEFAULT_EFFICIENCY, Plant, PlantConfig, PlantState, Setpoints
from tests.sites import ab_site, tiny_site

CURVE_POINTS = ((1.1, 60.0), (1.5, 5.0))
CURVE: dict[str, Any] = {"points": [list(p) for p in CURVE_POINTS], "instant_ratio": 3.0}


def plant_of(cfg: dict[str, Any], config: PlantConfig | None = None) -> Plant:
    return Plant(PowerTree(parse_site(cfg)), config)


def hot_rack_site() -> dict[str, Any]:
    """Tiny site whose rack breakers (2 kW) can be overloaded by their 4.4 kW of servers."""
    cfg = tiny_site()
    cfg["trip_curves"]["fast"] = CURVE
    rack = cfg["rows"][0]["racks"][0]
    rack["rating_w"] = 2000
    rack["envelope_w"] = 1800
    rack["trip_curve"] = "fast"
    rack["nodes"][0]["envelope_w"] = 800
    return cfg


def run(
    plant: Plant, state: PlantState, demand: np.ndarray, seconds: float, dt: float = 0.1, **kw: Any
) -> PlantState:
    for _ in range(round(seconds / dt)):
        state = plant.step(state, Setpoints(demand_w=demand, **kw), dt)
    return state


@settings(max_examples=40, deadline=None)
@given(
    demand=st.lists(st.floats(0, 700), min_size=16, max_size=16),
    limit=st.lists(st.floats(100, 500), min_size=16, max_size=16),
    ab=st.booleans(),
)
def test_energy_balance(demand: list[float], limit: list[float], ab: bool) -> None:
    plant = plant_of(ab_site() if ab else tiny_site())
    d = np.array(demand)
    lim = np.array(limit)
    s = plant.initial_state(limit_w=lim)
    s = run(plant, s, d, 0.5, limit_request_w=lim)
    gpu = np.minimum(d, lim)
    assert s.gpu_power_w == pytest.approx(gpu)
    assert s.gpu_total_w == pytest.approx(gpu.sum())
    assert s.baseline_total_w == pytest.approx(4 * 200)
    # Feed input = GPUs + baselines + losses, and losses are real (default curves < 1).
    balance = s.gpu_total_w + s.baseline_total_w + s.losses_w
    assert s.feed_power_w == pytest.approx(balance, rel=1e-12)
    assert s.losses_w > 0
    assert s.feed_power_w > s.gpu_total_w + s.baseline_total_w
    if ab:
        assert s.source_power_w.sum() == pytest.approx(s.feed_power_w)


def test_rack_reads_its_servers_over_psu_efficiency() -> None:
    """The documented measurement: a node's power is its input, children's input / efficiency."""
    plant = plant_of(tiny_site())
    d = np.full(16, 400.0)
    s = run(plant, plant.initial_state(), d, 0.3)
    servers_w = 2 * (4 * 400 + 200)
    load = servers_w / 8000
    xp, fp = zip(*DEFAULT_EFFICIENCY["rack"], strict=True)
    rack_w = servers_w / np.interp(load, xp, fp)
    assert plant.power_w(s, "rack-1") == pytest.approx(rack_w)
    assert plant.power_w(s, "rack-1-n1") == pytest.approx(1800)
    row = s.node_output_w[plant.node_index["row"]]
    assert row == pytest.approx(2 * rack_w)
    assert plant.power_w(s, "row") > row  # the row's rectifier loses some too


def test_extra_load_is_drawn_at_its_node_and_counted_above_it() -> None:
    """Load the config does not know (a cooling fault's fans) shows in the rack's meter and
    everything above, with the rack's losses, and keeps the energy balance; a trip above
    it darkens it like the rest."""
    plant = plant_of(tiny_site())
    d = np.full(16, 400.0)
    base = run(plant, plant.initial_state(), d, 0.3)
    extra = np.zeros(plant.n_nodes)
    extra[plant.node_index["rack-1-n1"]] = 900.0
    s = run(plant, base, d, 0.3, extra_load_w=extra)
    assert s.extra_total_w == pytest.approx(900.0)
    assert plant.power_w(s, "rack-1-n1") == pytest.approx(plant.power_w(base, "rack-1-n1") + 900)
    assert plant.power_w(s, "rack-2") == pytest.approx(plant.power_w(base, "rack-2"))
    # More than 900 W at the rack: its PSU shelf loses some of the extra too.
    assert plant.power_w(s, "rack-1") > plant.power_w(base, "rack-1") + 900
    assert s.gpu_total_w == pytest.approx(base.gpu_total_w)  # no GPU saw any of it
    balance = s.gpu_total_w + s.baseline_total_w + s.extra_total_w + s.losses_w
    assert s.feed_power_w == pytest.approx(balance, rel=1e-12)
    s = run(plant, s, d, 0.1, extra_load_w=None)
    assert s.extra_total_w == 0.0
    assert plant.power_w(s, "rack-1-n1") == pytest.approx(plant.power_w(base, "rack-1-n1"))


def trip_time(
    plant: Plant, demand: np.ndarray, dt: float = 0.1, limit_s: float = 400
) -> tuple[float, float]:
    """Seconds until rack-1 trips under a constant demand, and its load ratio."""
    s = plant.initial_state()
    s = plant.step(s, Setpoints(demand_w=demand), dt)
    ratio = plant.power_w(s, "rack-1") / 2000
    while not s.trips and s.t_s < limit_s:
        s = plant.step(s, Setpoints(demand_w=demand), dt)
    assert s.trips, "no trip"
    return s.trips[0].t_s, ratio


def allowed_s(ratio: float) -> float:
    (r0, t0), (r1, t1) = CURVE_POINTS
    slope = math.log(t1 / t0) / math.log(r1 / r0)
    return float(t0 * math.exp(slope * math.log(ratio / r0)))


@pytest.mark.parametrize("per_gpu_w", [220.0, 250.0, 300.0, 400.0])
def test_constant_overload_trips_at_curve_time(per_gpu_w: float) -> None:
    plant = plant_of(hot_rack_site())
    d = np.zeros(16)
    d[:8] = per_gpu_w  # load rack-1 only
    t, ratio = trip_time(plant, d)
    assert 1.1 < ratio < 3.0
    # log-log interpolation between points and extrapolation beyond the last one
    assert abs(t - allowed_s(ratio)) <= 0.1 + 1e-9


def test_trip_drops_everything_below_and_reclose_restores() -> None:
    plant = plant_of(hot_rack_site())
    d = np.full(16, 300.0)
    d[8:] = 150.0  # rack-2 stays below its rating
    s = run(plant, plant.initial_state(), d, 30)
    assert [e.element_id for e in s.trips] == ["rack-1"]
    assert s.trips[0].cause == "overload"
    assert plant.tripped_ids(s) == {"rack-1"}
    assert {"rack-1", "rack-1-n1", "rack-1-n2"} == plant.dark_ids(s)
    assert s.gpu_power_w[:8].tolist() == [0.0] * 8
    assert s.gpu_power_w[8:].tolist() == [150.0] * 8
    assert plant.power_w(s, "rack-1") == 0.0
    assert plant.power_w(s, "rack-2") > 0
    assert s.heat_pct[plant.element_index["rack-1"]] >= 100
    s = plant.reclose(s, ["rack-1"])
    s = plant.step(s, Setpoints(demand_w=np.full(16, 100.0)), 0.1)
    assert s.gpu_power_w.tolist() == [100.0] * 16
    assert not plant.tripped_ids(s)


def test_instant_trip_above_instant_ratio() -> None:
    cfg = hot_rack_site()
    # Just above what the rack's floors need (1,200 W): the config must stay feasible.
    cfg["rows"][0]["racks"][0]["rating_w"] = 1300
    cfg["rows"][0]["racks"][0]["envelope_w"] = 1250
    plant = plant_of(cfg)
    s = plant.initial_state()
    d = np.zeros(16)
    d[:8] = 450.0  # ~4 kW into a 1.3 kW breaker: above 3x
    s = plant.step(s, Setpoints(demand_w=d), 0.1)
    assert len(s.trips) == 1
    assert s.trips[0].cause == "instant"
    assert s.trips[0].load_ratio >= 3.0
    assert s.trips[0].t_s == pytest.approx(0.1)


def test_breaker_cools_below_rating_and_holds_no_trip() -> None:
    plant = plant_of(hot_rack_site())
    over = np.zeros(16)
    over[:8] = 300.0
    s = run(plant, plant.initial_state(), over, 3.0)
    hot = plant.heat_pct(s)["rack-1"]
    assert 10 < hot < 100
    s = run(plant, s, np.full(16, 50.0), 60.0)
    cooled = plant.heat_pct(s)["rack-1"]
    ratio = plant.power_w(s, "rack-1") / 2000
    # cools with cool_tau_s = 300 s, slowed by the remaining load (1 - (r / 1.1)^2)
    expected = hot * math.exp(-60 / 300 * (1 - (ratio / 1.1) ** 2))
    assert cooled == pytest.approx(expected, rel=1e-6)
    assert not s.trips


@settings(max_examples=25, deadline=None)
@given(delay=st.floats(0.0, 3.0), tau=st.floats(0.01, 0.1))
def test_actuation_delay_then_first_order_response(delay: float, tau: float) -> None:
    plant = plant_of(tiny_site(), PlantConfig(actuation_delay_s=delay, response_tau_s=tau))
    d = np.full(16, 500.0)
    s = plant.initial_state()
    s = plant.step(s, Setpoints(demand_w=d), 0.1)
    assert s.gpu_power_w.tolist() == [500.0] * 16
    t_req = s.t_s
    cap = np.full(16, 300.0)
    dt = 0.05
    while s.t_s < t_req + delay - 1e-9:
        s = plant.step(s, Setpoints(demand_w=d, limit_request_w=cap), dt)
        if s.t_s <= t_req + delay - 1e-9:
            assert s.gpu_limit_w.tolist() == [500.0] * 16, s.t_s
    s = run(plant, s, d, 6 * tau + dt, dt=dt, limit_request_w=cap)
    assert s.gpu_power_w == pytest.approx(np.full(16, 300.0), abs=1.0)
    assert s.gpu_target_w.tolist() == [300.0] * 16


def test_delay_override_per_step_and_requests_clamped_to_nvml_range() -> None:
    plant = plant_of(tiny_site())
    d = np.full(16, 500.0)
    s = plant.initial_state()
    low = np.full(16, 10.0)  # below min_w 100
    s = run(plant, s, d, 1.3, limit_request_w=low, actuation_delay_s=0.9)
    assert s.gpu_limit_w == pytest.approx(np.full(16, 100.0), abs=0.5)
    s2 = run(plant, plant.initial_state(), d, 0.5, limit_request_w=low, actuation_delay_s=0.9)
    assert s2.gpu_limit_w.tolist() == [500.0] * 16


def test_latest_landed_request_wins() -> None:
    plant = plant_of(tiny_site(), PlantConfig(actuation_delay_s=1.0))
    d = np.full(16, 500.0)
    s = plant.initial_state()
    s = run(plant, s, d, 0.5, limit_request_w=np.full(16, 300.0))
    s = run(plant, s, d, 0.5, limit_request_w=np.full(16, 400.0))
    # at 1.0 s the first request has landed, the second not yet
    assert s.gpu_target_w.tolist() == [300.0] * 16
    s = run(plant, s, d, 1.0, limit_request_w=np.full(16, 400.0))
    assert s.gpu_target_w.tolist() == [400.0] * 16
    assert s.gpu_power_w == pytest.approx(np.full(16, 400.0), abs=0.5)


def test_power_1s_is_a_boxcar_over_one_second() -> None:
    plant = plant_of(tiny_site())
    s = run(plant, plant.initial_state(), np.full(16, 100.0), 2.0)
    assert s.gpu_power_1s_w == pytest.approx(np.full(16, 100.0))
    s = run(plant, s, np.full(16, 500.0), 0.3)
    assert s.gpu_power_w[0] == 500.0
    assert s.gpu_power_1s_w[0] == pytest.approx(0.3 * 500 + 0.7 * 100)
    s = run(plant, s, np.full(16, 500.0), 0.7)
    assert s.gpu_power_1s_w[0] == pytest.approx(500.0)


def test_feed_source_loss_moves_load_to_survivor_and_both_lost_is_dark() -> None:
    plant = plant_of(ab_site())
    d = np.full(16, 300.0)
    s = run(plant, plant.initial_state(), d, 0.5)
    a, b = (plant.power_w(s, x) for x in ("feed-a", "feed-b"))
    assert a == pytest.approx(b)
    assert a + b == pytest.approx(s.feed_power_w)
    s = run(plant, s, d, 0.5, lost_sources=frozenset({"feed-a"}))
    assert plant.power_w(s, "feed-a") == 0.0
    assert plant.power_w(s, "feed-b") == pytest.approx(s.feed_power_w)
    assert s.gpu_power_w.tolist() == [300.0] * 16
    s = run(plant, s, d, 0.2, lost_sources=frozenset({"feed-a", "feed-b"}))
    assert s.feed_power_w == 0.0
    assert s.dark_gpu.all()
    assert not s.trips  # a lost source is not a trip
    s = run(plant, s, d, 0.2)
    assert s.gpu_power_w.tolist() == [300.0] * 16


def test_survivor_breaker_integrates_the_whole_load_and_trips() -> None:
    cfg = ab_site()
    cfg["trip_curves"]["fast"] = CURVE
    for src in cfg["feeds"][0]["sources"]:
        src.update(rating_w=5000, envelope_w=4500, trip_curve="fast")
    for level in (cfg["feeds"][0], cfg["ssts"][0], cfg["buses"][0], cfg["rows"][0]):
        level["envelope_w"] = 9000
    cfg["rows"][0]["racks"][0]["envelope_w"] = 4500
    plant = plant_of(cfg)
    d = np.full(16, 300.0)
    s = run(plant, plant.initial_state(), d, 1.0)
    assert not s.trips  # each side carries half: below rating
    s = plant.step(s, Setpoints(demand_w=d, lost_sources=frozenset({"feed-a"})), 0.1)
    ratio = plant.power_w(s, "feed-b") / 5000
    assert ratio > 1.1
    start = s.t_s - 0.1
    while not s.trips and s.t_s < 100:
        s = plant.step(s, Setpoints(demand_w=d, lost_sources=frozenset({"feed-a"})), 0.1)
    assert [e.element_id for e in s.trips] == ["feed-b"]
    assert abs(s.trips[0].t_s - start - allowed_s(ratio)) <= 0.1 + 1e-9
    assert s.dark_gpu.all()


def test_step_does_not_mutate_its_input() -> None:
    plant = plant_of(hot_rack_site())
    s0 = run(plant, plant.initial_state(), np.full(16, 300.0), 1.0)
    snapshot = {
        k: np.copy(getattr(s0, k)) for k in ("gpu_power_w", "heat", "tripped", "gpu_limit_w")
    }
    run(plant, s0, np.full(16, 400.0), 30.0, limit_request_w=np.full(16, 200.0))
    for k, v in snapshot.items():
        assert np.array_equal(getattr(s0, k), v), k
