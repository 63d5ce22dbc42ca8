"""The scenario benchmark: file validation, a short end-to-end run, determinism, the bound.

Runs use the real plant, scheduler, workloads and policies on a 16-GPU site written
inline (racks oversubscribed and given a fast trip curve, so a short run can show a
trip), and the real ``rackpower scenario run`` command on its own argparse parser.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from controller.cli import scenario_cmd
from controller.model.config import ConfigError
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy.index import tree_index
from sim.plant import Plant
from sim.scenario import RESULT_KEYS, Telemetry, TelemetryReading, run_policy
from sim.scenario_compare import MAX_CAP_CHANGES_PER_GPU_MIN
from sim.scenario_oracle import WorkOracle, chain_efficiency, concave_hull
from sim.scenario_spec import TelemetryOutage, load_scenario, parse_scenario
from sim.workloads import ThroughputCurve
from tests.sites import tiny_site

REPO = Path(__file__).resolve().parents[2]


def small_site() -> dict[str, Any]:
    """Tiny site with 1.15x racks (4.4 kW max draw, 3.8 kW envelope) and a fast breaker."""
    site = tiny_site()
    site["trip_curves"]["fast"] = {"points": [[1.05, 60], [1.2, 10]], "instant_ratio": 3}
    rack = site["rows"][0]["racks"][0]
    rack.update(rating_w=3900, envelope_w=3800, trip_curve="fast")
    return site


def step_scenario(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "tiny-step",
        "site": small_site(),
        "seed": 7,
        "duration_s": 90,
        "demand_scale": 0.7,
        "workloads": {
            "training": [{"id": "t-{i}", "count": 2, "gpus": 8}],
        },
        "events": [{"at_s": 40, "kind": "load_step", "factor": 1.4}],
    }
    doc.update(overrides)
    return doc


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rackpower")
    sub = parser.add_subparsers(dest="command")
    scenario_cmd.register(sub)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def write(tmp_path: Path, doc: dict[str, Any], name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        (
            {"events": [{"at_s": 1, "kind": "load_step", "factor": 1.3, "x": 1}]},
            "events[0].x",
            "unknown key",
        ),
        (
            {"events": [{"at_s": 1, "kind": "feed_loss", "source": "nope"}]},
            "events[0].source",
            "unknown feed source 'nope'",
        ),
        (
            {"events": [{"at_s": 99, "kind": "actuation_delay", "delay_s": 1}]},
            "events[0].at_s",
            "after the run ends",
        ),
        (
            {"events": [{"at_s": 1, "kind": "demand_response", "node": "rack-9"}]},
            "events[0].node",
            "unknown node 'rack-9'",
        ),
        (
            {"events": [{"at_s": 1, "kind": "extra_load", "node": "rack-9", "power_w": 1}]},
            "events[0].node",
            "unknown node 'rack-9'",
        ),
        (
            {"events": [{"at_s": 1, "kind": "extra_load", "node": "rack-1", "power_w": 0}]},
            "events[0].power_w",
            "greater than 0",
        ),
        (
            {"workloads": {"training": [{"id": "t", "gpus": 4, "priority_class": "gold"}]}},
            "workloads.training[0].priority_class",
            "unknown class 'gold'",
        ),
        (
            {"workloads": {"training": [{"id": "t{i}", "count": 3, "gpus": 8}]}},
            "workloads",
            "need 24 GPUs, the site has 16",
        ),
        ({"step_s": 0}, "step_s", "greater than 0"),
        (
            {"workloads": {"training": [{"id": "t-{j}", "count": 2, "gpus": 4}]}},
            "workloads.training[0]",
            "only {i} may be filled in",
        ),
        ({"telemetry": {"gpu_power": "psychic"}}, "telemetry.gpu_power", "'instant' or 'average'"),
    ],
)
def test_bad_scenario_exits_2_naming_file_and_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    where: str,
    message: str,
) -> None:
    path = write(tmp_path, step_scenario(**change))
    assert run_cli(["scenario", "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {where}: " in err and message in err, err


def test_site_path_is_relative_to_the_scenario_and_its_errors_name_the_site(
    tmp_path: Path,
) -> None:
    (tmp_path / "sites").mkdir()
    bad = small_site()
    bad["rows"][0]["racks"][0]["envelope_w"] = 99999  # above its rating
    (tmp_path / "sites" / "tiny.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    (tmp_path / "scenarios").mkdir()
    path = write(tmp_path / "scenarios", step_scenario(site="../sites/tiny.yaml"))
    with pytest.raises(ConfigError) as exc:
        load_scenario(path)
    assert exc.value.source.endswith("sites/tiny.yaml")
    assert "exceeds rating_w" in str(exc.value)
    missing = write(tmp_path / "scenarios", step_scenario(site="../sites/none.yaml"), "m.yaml")
    with pytest.raises(ConfigError, match=r"m\.yaml: site: no site file"):
        load_scenario(missing)


def test_every_shipped_scenario_loads() -> None:
    names = set()
    for path in sorted((REPO / "configs" / "scenarios").glob("*.yaml")):
        sc = load_scenario(path)
        names.add(sc.name)
        assert sc.spec.duration_s <= 1800, "keep shipped scenarios runnable in minutes"
    assert {
        "steady-training",
        "mixed-priorities",
        "sync-step",
        "feed-a-loss",
        "demand-response",
        "cooling-fault",
    } <= names


# -- end to end ---------------------------------------------------------------------


def test_step_scenario_end_to_end_json(tmp_path: Path) -> None:
    path = write(tmp_path, step_scenario())
    out = tmp_path / "out.json"
    argv = ["scenario", "run", str(path), "--policy", "none", "--policy", "rackpower"]
    assert run_cli([*argv, "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["scenario"] == "tiny-step"
    assert list(doc["results"]) == ["none", "rackpower"]
    for r in doc["results"].values():
        assert set(RESULT_KEYS) <= set(r)
        assert r["sim_s"] == pytest.approx(90.0)
        assert r["wall_s"] > 0
        assert r["work_demanded"]["total"] > 0
        assert set(r["work_delivered"]) == {"total", "training"}
        assert 0 <= r["work_delivered"]["total"] <= r["work_demanded"]["total"] + 1e-6
    none, rp = doc["results"]["none"], doc["results"]["rackpower"]
    # Uncapped, a 1.15x rack sits over its envelope from the step on and the fast breaker
    # trips; rackpower caps within a cycle or two of the step.
    assert none["trips"] >= 1 and none["worst_i2t_pct"] == 100.0
    assert none["seconds_over_envelope"] > 20.0
    assert none["cap_changes_per_gpu_min"] == 0.0
    assert rp["trips"] == 0 and rp["worst_i2t_pct"] < 50.0
    assert rp["seconds_over_envelope"] < 5.0
    assert rp["priority_inversions"] == 0
    # 90 s hold one start (capped while the jobs load, raised once they ran: startup.py)
    # and the step: a handful of changes per GPU, inside the benchmark's gate (issue 13:
    # at most 6 per GPU per minute), not an oscillation.
    assert 0 < rp["cap_changes_per_gpu_min"] <= MAX_CAP_CHANGES_PER_GPU_MIN
    # Inside the envelopes almost always, so no better than the bound allows.
    assert rp["work_delivered"]["total"] <= rp["oracle_work"] * 1.01
    assert rp["work_delivered"]["total"] > none["work_delivered"]["total"]
    assert rp["peak_ramp_w_per_s"] > 0


def test_same_seed_same_figures_bit_for_bit() -> None:
    sc = parse_scenario(step_scenario(duration_s=30, events=[]), "det.yaml")
    a = run_policy(sc, "rackpower")
    b = run_policy(sc, "rackpower")
    a.pop("wall_s")
    b.pop("wall_s")
    assert a == b
    other = parse_scenario(step_scenario(duration_s=30, events=[], seed=8), "det.yaml")
    c = run_policy(other, "rackpower")
    c.pop("wall_s")
    assert c != a, "a different seed draws different jobs"


def test_feed_loss_and_outage_events_reach_plant_and_snapshot() -> None:
    site = small_site()
    for key, env in (("feeds", 12000), ("ssts", 11000), ("buses", 10500), ("rows", 10000)):
        site[key][0]["envelope_w"] = env
    site["feeds"][0]["sources"] = [
        {"id": "a", "rating_w": 7000, "envelope_w": 6000, "trip_curve": "fast"},
        {"id": "b", "rating_w": 7000, "envelope_w": 6000, "trip_curve": "fast"},
    ]
    loss = [{"at_s": 50, "kind": "feed_loss", "source": "a", "duration_s": 20}]
    sc = parse_scenario(
        step_scenario(site=site, events=loss, duration_s=80, demand_scale=1.0), "loss.yaml"
    )
    quiet = parse_scenario(
        step_scenario(site=site, events=[], duration_s=80, demand_scale=1.0), "quiet.yaml"
    )
    none = run_policy(sc, "none")
    assert [e["element"] for e in none["trip_events"]][:1] == ["b"], "side B carries it all"
    rp = run_policy(sc, "rackpower")
    assert rp["trips"] == 0
    # Static recomputes its caps when the envelope shrinks, and again when A comes back.
    assert (
        run_policy(sc, "static")["cap_changes_per_gpu_min"]
        > run_policy(quiet, "static")["cap_changes_per_gpu_min"]
    )
    tree = PowerTree(sc.site)
    plant = Plant(tree)
    tel = Telemetry(sc, tree, plant)
    state = plant.initial_state(demand_w=np.full(16, 300.0))
    outage = TelemetryOutage(at_s=0.0, kind="telemetry_outage", duration_s=5, scope="meters")
    reading = tel.read(state)
    assert isinstance(reading, TelemetryReading)
    assert set(reading.node_w) == {"feed", "rack-1", "rack-2"}
    node_w, power, limit = tel.masked(reading, [outage])
    assert all(v is None for v in node_w.values())
    assert np.all(power == 300.0) and np.all(limit == 500.0)
    gpus = TelemetryOutage(
        at_s=0.0, kind="telemetry_outage", duration_s=5, scope="gpus", nodes=["rack-2"]
    )
    node_w, power, limit = tel.masked(reading, [gpus])
    assert node_w["rack-1"] == reading.node_w["rack-1"]
    assert np.all(np.isnan(power[8:])) and np.all(power[:8] == 300.0)


# -- the work bound -------------------------------------------------------------------


def test_concave_hull_of_the_throughput_curve() -> None:
    x, y = concave_hull(ThroughputCurve().points)
    assert x[0] == 0.0 and x[-1] == 1.0 and y[-1] == 1.0
    slopes = np.diff(y) / np.diff(x)
    assert np.all(np.diff(slopes) < 0), "concave"
    curve = ThroughputCurve()
    grid = np.linspace(0, 1, 101)
    assert np.all(np.interp(grid, x, y) >= curve.rate(grid) - 1e-12), "above the curve"


def test_bound_is_above_any_feasible_allocation_and_exact_when_nothing_binds() -> None:
    tree = PowerTree(parse_site(small_site(), "tiny"))
    index = tree_index(tree)
    oracle = WorkOracle(index, np.ones(index.n_nodes), ThroughputCurve())
    curve = ThroughputCurve()
    demand = np.full(16, 480.0)
    weight = np.ones(16)
    group = np.repeat([0, 1], 8)  # one synchronous job per rack
    budget = index.envelope_w - index.base_w
    assert oracle.bound(np.full(16, 100.0), weight, group, budget) == 16.0
    rng = np.random.default_rng(3)
    best = oracle.bound(demand, weight, group, budget)
    for _ in range(200):
        caps = rng.uniform(100, 500, 2)
        power = np.repeat(caps, 8)
        if np.any(index.seg_sum(np.minimum(power, demand)) > budget):
            continue
        x = np.minimum(power / demand, 1.0)
        work = 8 * float(curve.rate(x[[0, 8]]).sum())
        assert work <= best + 1e-9
    # Tight: the even split the racks allow comes within a few percent of the bound.
    even = (3800 - 400) / 8
    x_even = np.array([min(even / 480.0, 1.0)])
    assert 16 * float(curve.rate(x_even)[0]) >= 0.97 * best


def test_stale_prices_still_bound_and_a_new_placement_is_seen() -> None:
    """A scenario re-prices once per policy cycle: the steps between use old prices."""
    tree = PowerTree(parse_site(small_site(), "tiny"))
    index = tree_index(tree)
    budget = index.envelope_w - index.base_w
    weight = np.ones(16)
    group = np.repeat([0, 1], 8)
    oracle = WorkOracle(index, np.ones(index.n_nodes), ThroughputCurve())
    oracle.bound(np.full(16, 480.0), weight, group, budget)  # prices for this demand
    rng = np.random.default_rng(5)
    for _ in range(20):
        demand = rng.uniform(150.0, 600.0, 16)
        stale = oracle.bound(demand, weight, group, budget, reprice=False)
        fresh = WorkOracle(index, np.ones(index.n_nodes), ThroughputCurve()).bound(
            demand, weight, group, budget
        )
        for _ in range(20):  # both above what any allocation inside the racks delivers
            power = np.repeat(rng.uniform(100.0, 600.0, 2), 8)
            if np.any(index.seg_sum(np.minimum(power, demand)) > budget):
                continue
            x = np.minimum(power / demand, 1.0)
            work = sum(
                8 * float(ThroughputCurve().rate(x[a : a + 8].min(keepdims=True))[0])
                for a in (0, 8)
            )
            assert work <= fresh + 1e-9 and work <= stale + 1e-9
    # The same oracle follows a new placement (a new group array, four 4-GPU jobs).
    regroup = np.repeat([0, 1, 2, 3], 4)
    demand = np.full(16, 480.0)
    again = oracle.bound(demand, weight, regroup, budget)
    first = WorkOracle(index, np.ones(index.n_nodes), ThroughputCurve()).bound(
        demand, weight, regroup, budget
    )
    assert again == pytest.approx(first, rel=1e-12)
    # A writable group array changed in place is a new placement too, and group ids
    # need not be dense.
    moved = np.repeat([0, 1], 8)
    oracle.bound(demand, weight, moved, budget)
    moved[8:] = 10**9
    fresh_moved = WorkOracle(index, np.ones(index.n_nodes), ThroughputCurve()).bound(
        demand, weight, moved.copy(), budget
    )
    assert oracle.bound(demand, weight, moved, budget) == pytest.approx(fresh_moved)
    # A GPU whose weight is 0 (checkpoint, idle replica) adds no work.
    idle = weight.copy()
    idle[:8] = 0.0
    assert oracle.bound(np.full(16, 100.0), idle, group, budget) == 8.0


def test_chain_efficiency_takes_the_best_converters() -> None:
    site = small_site()
    site["rows"][0]["efficiency"] = {"points": [[0.5, 0.95], [1.0, 0.97]]}
    tree = PowerTree(parse_site(site, "tiny"))
    index = tree_index(tree)
    eta = chain_efficiency(
        tree, index, {"row": ((0.5, 0.95), (1.0, 0.97)), "rack-1": ((0.5, 0.9),)}
    )
    by_id = dict(zip(index.node_ids, eta.tolist(), strict=True))
    assert by_id["rack-1"] == pytest.approx(0.9)
    assert by_id["rack-2"] == pytest.approx(1.0)
    assert by_id["row"] == pytest.approx(0.97)  # best child chain is rack-2's 1.0
    assert by_id["feed"] == pytest.approx(0.97)


def test_scenario_copy_is_independent() -> None:
    doc = step_scenario()
    sc = parse_scenario(copy.deepcopy(doc), "a.yaml")
    assert sc.cycle_s == 0.5 and sc.spec.step_s == 0.1


# -- the inversion metric ---------------------------------------------------------------


def _inversions(limit_rack1_idle_w: float) -> int:
    """Training job H on GPUs 0-3 (rack-1) and 8-11 (rack-2) capped at 300 W below its
    480 W demand; batch job L on 12-15 (rack-2) at 500 W, above its 100 W floor."""
    from controller.policy.types import Job
    from sim.scenario_metrics import InversionCheck

    tree = PowerTree(parse_site(small_site(), "tiny"))
    index = tree_index(tree)
    check = InversionCheck(index, {"critical": 0, "training": 1, "inference": 2, "batch": 3})
    jobs = [Job("h", "training", (0, 1, 2, 3, 8, 9, 10, 11)), Job("l", "batch", (12, 13, 14, 15))]
    demand = np.full(16, 480.0)
    limit = np.full(16, 300.0)
    limit[4:8] = limit_rack1_idle_w
    limit[12:16] = 500.0
    return check.count(
        jobs,
        demand,
        limit,
        index.gpu_floor_w,
        np.ones(index.n_nodes),
        index.envelope_w,
        index.base_w,
    )


def test_inversion_needs_the_lower_job_under_every_node_holding_the_higher_one() -> None:
    # Rack-1's limits commit its envelope (4 x 300 + 4 x 500 + 400 W >= 90 % of 3.8 kW):
    # H is held there too, where no batch power could be moved to it: no inversion.
    assert _inversions(limit_rack1_idle_w=500.0) == 0
    # With rack-1's other GPUs at 100 W nothing holds H back in rack-1; only rack-2 (and
    # the row above), where batch runs above its floor: an inversion.
    assert _inversions(limit_rack1_idle_w=100.0) == 1


def test_cooling_fault_escalates_through_the_simulated_scheduler() -> None:
    """The shipped cooling-fault scenario, cut to 5 minutes: load no cap reaches lands on
    a rack of batch jobs at 120 s; rackpower moves them away through the simulated
    scheduler (one per 30 s interval, lowest class first) instead of holding the rack
    over its envelope, and nothing trips. ``static`` has no way out and trips."""
    sc = load_scenario(REPO / "configs" / "scenarios" / "cooling-fault.yaml")
    short = dataclasses.replace(sc, spec=sc.spec.model_copy(update={"duration_s": 300.0}))
    rp = run_policy(short, "rackpower", work_bound=False)
    assert rp["trips"] == 0
    assert 1 <= rp["migrations"] <= 2  # one at a time, never more than one per 30 s
    # Over the envelope from the fault until the rack is feasible again, not for good.
    assert rp["seconds_over_envelope"] < 90.0
    assert rp["work_delivered"]["batch"] > 0
    static = run_policy(short, "static", work_bound=False)
    assert static["migrations"] == 0 and static["trips"] >= 1
