"""The rackpower policy: table tests and multi-cycle sequences on a toy plant.

Tiny site: 2 racks x 8 GPUs (100-500 W), 400 W of baselines per rack. With the rack
envelope at 3800 W the bands are: cap above 3686 W, aim at 3572 W, release below 3420 W.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import (
    Job,
    Migrate,
    Requeue,
    SetCap,
    Snapshot,
    allowed_s,
    decide,
    headroom_w,
)
from controller.policy.startup import STARTUP_RESERVE_S
from tests.helpers.policy_support import Run, meter_readings, tree_for
from tests.sites import ab_site

TGT = 0.94 * 3800
HI = 0.97 * 3800
LO = 0.90 * 3800


def uniform(value: float, n: int = 16) -> np.ndarray:
    return np.full(n, value, dtype=np.float64)


def rack1(power: np.ndarray) -> float:
    return float(power[:8].sum() + 400)


# ---------------------------------------------------------------------------
# Single cycles


def test_quiet_site_is_left_alone() -> None:
    run = Run(tree_for())
    run.repeat(5, lambda _: uniform(300.0))
    assert run.cap_changes() == 0
    assert np.all(run.limit_w == 500.0)
    assert run.state is not None
    assert set(run.state.nodes.mode) <= {"release", "hold"}


def test_step_up_caps_at_once_down_to_target() -> None:
    run = Run(tree_for())
    run.step(uniform(300.0))
    acts = run.step(uniform(480.0))  # rack 4240 W: above its 3686 W cap threshold
    assert acts, "an overloaded rack must be capped in the cycle that sees it"
    planned = np.minimum(run.limit_w, 480.0)
    assert rack1(planned) <= TGT + 1.0
    assert rack1(planned) >= TGT - 8 * 1.0 - 1.0  # aims at target, not far below
    run.step(uniform(480.0))
    assert rack1(run.powers[-1]) <= TGT + 1.0


def test_caps_below_the_aim_rise_to_it_inside_the_band() -> None:
    """Caps that alone keep a rack inside need no hold below the aim.

    Every GPU is held at its cap, so the plan is the caps themselves: the rack sits in
    the hold band (above release, below the cap threshold). Holding there left the gap
    to the aim unused for good although no demand can push the rack past its caps.
    """
    run = Run(tree_for(), limit_w=uniform(385.0))  # rack 3480 W: inside the hold band
    run.repeat(6, lambda _: uniform(480.0))
    planned = np.minimum(run.limit_w, 480.0)
    assert rack1(planned) >= TGT - 8 * 1.0 - 1.0
    assert rack1(planned) <= TGT + 1.0
    assert max(rack1(p) for p in run.powers) <= TGT + 1.0


def test_a_new_job_is_capped_at_its_budget_before_it_ramps() -> None:
    """A job appears while it loads (near idle), then all its GPUs step up at once.

    Planned on what it draws, its share would go to the running job and the step would
    land on a spent budget: 4240 W on a 3800 W rack until the caps bite. Planned at its
    maximum from the cycle it appears, both jobs are capped to the aim before it rises.
    """
    a = Job("a", "training", (0, 1, 2, 3))
    b = Job("b", "training", (4, 5, 6, 7))
    run = Run(tree_for(), jobs=(a,))
    running = np.array([480.0] * 4 + [60.0] * 4 + [300.0] * 8)
    run.repeat(3, lambda _: running)
    assert rack1(run.powers[-1]) < LO  # nothing to cap while b's GPUs idle
    run.jobs = (a, b)
    run.repeat(3, lambda _: running)  # b loads
    run.repeat(6, lambda _: uniform(480.0))  # b steps up
    assert max(rack1(p) for p in run.powers) <= TGT + 1.0
    assert rack1(run.powers[-1]) >= TGT - 8 * 1.0 - 1.0  # and the rack is not starved


def test_a_loading_job_is_believed_after_its_reserve_time() -> None:
    """A job that never ramps stops holding its maximum after ``STARTUP_RESERVE_S``."""
    a = Job("a", "training", (0, 1, 2, 3))
    b = Job("b", "training", (4, 5, 6, 7))
    run = Run(tree_for(), jobs=(a, b), dt_s=5.0)
    demand = np.array([480.0] * 4 + [60.0] * 4 + [300.0] * 8)
    run.step(demand)
    assert run.limit_w[0] < 480.0  # b's reservation holds a back
    run.repeat(int(STARTUP_RESERVE_S / 5.0) + 10, lambda _: demand)
    assert run.limit_w[0] == 500.0  # b believed idle: a uncapped again


def test_reason_names_the_node_and_its_numbers() -> None:
    run = Run(tree_for(), jobs=(Job("j1", "batch", tuple(range(8))),))
    acts = run.step(uniform(480.0))
    caps = [a for a in acts if isinstance(a, SetCap) and a.job_id == "j1"]
    assert len(caps) == 1
    reason = caps[0].reason
    assert caps[0].node_id == "rack-1"
    assert reason.startswith("rack-1:")
    assert "4.2 kW" in reason and "3.8 kW" in reason  # load and envelope
    assert "batch job j1 500 W ->" in reason


def test_lower_class_is_capped_before_higher() -> None:
    jobs = (Job("train", "training", (0, 1, 2, 3)), Job("batch", "batch", (4, 5, 6, 7)))
    run = Run(tree_for(), jobs=jobs)
    run.step(uniform(480.0))
    assert np.all(run.limit_w[:4] >= 480.0), "training must keep its demand"
    assert np.all(run.limit_w[4:8] < 480.0)
    assert np.all(run.limit_w[4:8] == run.limit_w[4])
    assert rack1(np.minimum(run.limit_w, 480.0)) <= TGT + 1.0


def test_synchronous_job_gets_one_cap_across_racks_and_others_use_the_rest() -> None:
    jobs = (
        Job("crit", "critical", (4, 5, 6, 7)),
        Job("x", "training", (0, 1, 2, 3, 8, 9, 10, 11)),
        Job("b", "batch", (12, 13, 14, 15)),
    )
    run = Run(tree_for(), jobs=jobs)
    run.step(uniform(480.0))
    x_caps = run.limit_w[[0, 1, 2, 3, 8, 9, 10, 11]]
    assert np.all(x_caps == x_caps[0]), "one cap for the whole job"
    assert x_caps[0] < 480.0  # rack-1 holds it back (critical comes first there)
    assert np.all(run.limit_w[4:8] >= 480.0)
    # In rack-2 the job cannot use more than its cap; the batch job gets what is left.
    assert np.all(run.limit_w[12:16] >= 480.0)
    actions = [a for a in run.actions[-1] if isinstance(a, SetCap) and a.job_id == "x"]
    assert len(actions) == 1 and len(actions[0].gpus) == 8


def test_unassigned_gpus_are_grouped_by_server() -> None:
    run = Run(tree_for())
    acts = run.step(uniform(480.0))
    by_gpus = sorted(a.gpus for a in acts if isinstance(a, SetCap))
    assert (0, 1, 2, 3) in by_gpus and (4, 5, 6, 7) in by_gpus
    assert all(a.job_id is None for a in acts if isinstance(a, SetCap))


def test_caps_never_leave_floor_and_max_when_floors_do_not_fit() -> None:
    run = Run(tree_for())
    run.step(uniform(480.0), envelope_override_w={"rack-1": 1150.0})  # floors need 1200 W
    assert np.all(run.limit_w[:8] == 100.0)
    assert np.all(run.limit_w <= 500.0)


# ---------------------------------------------------------------------------
# Sequences


def test_holds_inside_the_band_without_oscillating_on_noisy_load() -> None:
    rng = np.random.default_rng(7)
    jobs = (Job("train", "training", (0, 1, 2, 3)), Job("batch", "batch", tuple(range(4, 16))))
    run = Run(tree_for(), jobs=jobs)

    def noisy(_: int) -> np.ndarray:
        demand = uniform(480.0)
        demand[:4] = 380.0
        return demand + rng.normal(0.0, 6.0, 16)

    run.repeat(240, noisy)
    settled = run.cap_changes(since=10)
    minutes = 230 * run.dt_s / 60
    assert settled / 16 / minutes < 0.5, f"{settled} cap changes after settling"
    loads = [rack1(p) for p in run.powers[10:]]
    assert max(loads) <= HI
    assert min(loads) >= LO - 100.0, "holding, not draining the rack"


def test_synchronized_swings_keep_caps_stable_and_inside_envelope() -> None:
    """Training swings compute/communication every cycle; caps must fit the peak, once."""
    run = Run(tree_for(), jobs=(Job("t", "training", tuple(range(16))),))
    run.repeat(120, lambda i: uniform(490.0 if i % 2 else 200.0))
    assert run.cap_changes(since=4) == 0
    # The first swing comes before anything is known; after it, never above the threshold.
    assert max(rack1(p) for p in run.powers[2:]) <= HI


def test_release_is_ramped_and_does_not_overshoot() -> None:
    jobs = (Job("a", "batch", (0, 1, 2, 3)), Job("b", "batch", (4, 5, 6, 7)))
    run = Run(tree_for(), jobs=jobs)
    run.repeat(10, lambda _: uniform(480.0))
    capped = run.limit_w[4]
    assert capped < 450.0

    def a_ends(_: int) -> np.ndarray:
        demand = uniform(480.0)
        demand[:4] = 100.0
        return demand

    run.repeat(80, a_ends)
    b = [lim[4] for lim in run.limits[10:]]
    assert b[-1] == 480.0 or b[-1] == 500.0 or rack1(run.powers[-1]) >= LO
    assert all(y >= x for x, y in itertools_pairwise(b)), "release never steps back"
    rises = [y - x for x, y in itertools_pairwise(b) if y > x]
    assert len(rises) >= 3, f"release must be ramped, got {rises}"
    assert max(rack1(p) for p in run.powers[10:]) <= HI


def itertools_pairwise(xs: list[float]) -> list[tuple[float, float]]:
    return list(itertools.pairwise(xs))


# The load that "goes away" below stays above half the GPUs' maximum: an idle GPU in no
# job keeps a cap at its share however long it idles (test_policy_unwarned_step.py).
RUNNING_LOW_W = 300.0


def test_full_release_when_load_goes_away() -> None:
    run = Run(tree_for())
    run.repeat(6, lambda _: uniform(480.0))
    assert run.limit_w[0] < 480.0
    run.repeat(80, lambda _: uniform(RUNNING_LOW_W))
    assert np.all(run.limit_w == 500.0)


def test_silent_rack_meter_blocks_release() -> None:
    run = Run(tree_for())
    run.repeat(6, lambda _: uniform(480.0))
    capped = run.limit_w.copy()
    run.repeat(60, lambda _: uniform(RUNNING_LOW_W), node_power_w={"rack-1": None})
    assert np.all(run.limit_w[:8] <= capped[:8]), "no uncapping on a silent meter"
    assert np.all(run.limit_w[8:] == 500.0), "the other rack is released"
    assert run.state is not None
    status = run.state.nodes.as_dict()["rack-1"]
    assert status["load_w"] == pytest.approx(4180.0)  # the rack's rating: worst case
    assert status["mode"] == "cap"


def test_silent_meter_does_not_ratchet_caps_to_floor() -> None:
    run = Run(tree_for())
    run.repeat(6, lambda _: uniform(480.0))
    capped = run.limit_w.copy()
    run.repeat(20, lambda _: uniform(480.0), node_power_w={"rack-1": None})
    assert np.all(run.limit_w[:8] >= capped[:8] - 60.0)
    assert np.all(run.limit_w[:8] > 100.0)


def test_stale_gpu_counts_at_max_and_is_never_raised() -> None:
    run = Run(tree_for())
    run.repeat(6, lambda _: uniform(480.0))
    capped = run.limit_w.copy()
    run.repeat(60, lambda _: uniform(RUNNING_LOW_W), stale_gpus=[3])
    assert run.limit_w[3] <= capped[3]
    assert run.limit_w[8] == 500.0


def test_missing_meter_of_a_metered_node_is_worst_case() -> None:
    tree = tree_for()
    power = uniform(300.0)
    meters = meter_readings(tree, power)
    del meters["rack-2"]
    snap = Snapshot.build(
        tree, 0.0, gpu_power_w=power, gpu_limit_w=uniform(500.0), node_power_w=meters
    )
    _, state = decide(snap, tree, None)
    assert state.nodes.as_dict()["rack-2"]["load_w"] == pytest.approx(4180.0)


def test_lost_feed_source_shrinks_the_feed_envelope() -> None:
    site = ab_site()
    site["feeds"][0]["envelope_w"] = 17000
    for src in site["feeds"][0]["sources"]:
        src.update(rating_w=10000, envelope_w=9000)
    tree = PowerTree(parse_site(site))
    run = Run(tree)
    run.repeat(3, lambda _: uniform(500.0))
    assert np.all(run.limit_w == 500.0)  # 8800 W on a 17 kW pair
    run.repeat(3, lambda _: uniform(500.0), lost_sources=frozenset({"feed-a"}))
    total = float(np.minimum(run.limit_w, 500.0).sum() + 800)
    assert total <= 0.94 * 9000 + 1.0
    assert run.state is not None
    assert run.state.nodes.as_dict()["feed"]["envelope_w"] == 9000.0


def test_demand_response_override_is_obeyed() -> None:
    run = Run(tree_for())
    run.repeat(3, lambda _: uniform(400.0), envelope_override_w={"row": 6000.0})
    row = float(np.minimum(run.limit_w, 400.0).sum() + 800)
    assert row <= 0.94 * 6000 + 1.0


def test_reservations_are_held_back() -> None:
    run = Run(tree_for())
    run.repeat(3, lambda _: uniform(400.0), reservations_w={"rack-1": 800.0})
    assert rack1(np.minimum(run.limit_w, 400.0)) + 800 <= TGT + 1.0
    assert np.all(run.limit_w[8:] == 500.0)


def test_conversion_losses_are_budgeted_in_measured_watts() -> None:
    run = Run(tree_for(), loss=1.06)
    run.repeat(30, lambda _: uniform(480.0))
    measured = [meter_readings(run.tree, p, 1.06)["rack-1"] for p in run.powers[3:]]
    assert max(measured) <= HI
    assert max(measured) >= LO - 50.0


def test_margin_learns_the_worst_rise_and_is_bounded() -> None:
    quiet = Run(tree_for(rack_envelope_w=6000.0))
    quiet.repeat(20, lambda _: uniform(300.0))
    assert quiet.state is not None
    assert quiet.state.nodes.as_dict()["rack-1"]["margin_w"] == pytest.approx(0.02 * 6000)

    swing = Run(tree_for(rack_envelope_w=6000.0))
    swing.repeat(20, lambda i: uniform(330.0 if i % 2 else 300.0))  # rises of 240 W
    assert swing.state is not None
    assert swing.state.nodes.as_dict()["rack-1"]["margin_w"] == pytest.approx(240.0)

    wild = Run(tree_for(rack_envelope_w=6000.0))
    wild.repeat(20, lambda i: uniform(480.0 if i % 2 else 150.0))
    assert wild.state is not None
    assert wild.state.nodes.as_dict()["rack-1"]["margin_w"] == pytest.approx(0.15 * 6000)


def test_large_learned_margin_caps_uncapped_load_before_it_can_rise() -> None:
    """A rack that swings by 2.6 kW keeps caps that stop the next swing at the envelope."""
    run = Run(tree_for(), jobs=(Job("t", "training", tuple(range(16))),))
    run.repeat(2, lambda _: uniform(150.0))
    run.repeat(40, lambda i: uniform(480.0 if i % 2 else 150.0))
    assert max(rack1(p) for p in run.powers[4:]) <= HI


# ---------------------------------------------------------------------------
# Escalation


def test_escalation_moves_one_lowest_priority_job_then_waits() -> None:
    jobs = (
        Job("train", "training", (0, 1, 2, 3), migratable=True),
        Job("batch", "batch", (4, 5, 6, 7), migratable=True),
        Job("crit", "critical", (8, 9, 10, 11), migratable=False),
    )
    run = Run(tree_for(), jobs=jobs)
    # Floors need 1200 W; half the breaker's allowance is gone: act now.
    run.repeat(
        100,
        lambda _: uniform(480.0),
        envelope_override_w={"rack-1": 1000.0},
        trip_used={"rack-1": 0.6},
    )
    moves = [a for acts in run.actions for a in acts if isinstance(a, Migrate | Requeue)]
    assert len(moves) == 1, moves
    assert moves[0].job_id == "batch" and moves[0].node_id == "rack-1"
    assert "rack-1" in moves[0].reason and "floor" in moves[0].reason
    assert isinstance(moves[0], Migrate | Requeue)


def test_escalation_again_only_after_the_interval() -> None:
    jobs = (
        Job("train", "training", (0, 1, 2, 3), migratable=True),
        Job("batch", "batch", (4, 5, 6, 7), migratable=True),
    )
    run = Run(tree_for(), jobs=jobs)
    # No trip risk: the envelope violation must persist for the interval (120 s) first.
    run.repeat(500, lambda _: uniform(480.0), envelope_override_w={"rack-1": 1000.0})
    moves = [
        (i, a)
        for i, acts in enumerate(run.actions)
        for a in acts
        if isinstance(a, Migrate | Requeue)
    ]
    # The toy plant never moves the job, so after the interval it is asked for again.
    assert [a.job_id for _, a in moves] == ["batch", "batch"]
    assert moves[0][0] * run.dt_s >= 120.0
    assert (moves[1][0] - moves[0][0]) * run.dt_s >= 120.0


def test_no_escalation_without_a_migratable_job_or_when_caps_suffice() -> None:
    run = Run(tree_for(), jobs=(Job("c", "critical", tuple(range(8))),))
    run.repeat(
        20,
        lambda _: uniform(480.0),
        envelope_override_w={"rack-1": 1000.0},
        trip_used={"rack-1": 0.9},
    )
    assert not [a for acts in run.actions for a in acts if not isinstance(a, SetCap)]
    run2 = Run(tree_for(), jobs=(Job("b", "batch", tuple(range(8)), migratable=True),))
    run2.repeat(300, lambda _: uniform(480.0))
    assert not [a for acts in run2.actions for a in acts if not isinstance(a, SetCap)]


# ---------------------------------------------------------------------------
# Helpers the API and callers use


def test_headroom_is_envelope_minus_load_minus_reservations() -> None:
    tree = tree_for()
    power = uniform(300.0)
    snap = Snapshot.build(
        tree,
        0.0,
        gpu_power_w=power,
        gpu_limit_w=uniform(500.0),
        node_power_w={**meter_readings(tree, power), "rack-1": 2900.0},
        reservations_w={"rack-1": 250.0},
    )
    room = headroom_w(snap, tree)
    assert room["rack-1"] == pytest.approx(3800 - 2900 - 250)
    assert room["rack-2"] == pytest.approx(3800 - 2800)
    assert room["row"] == pytest.approx(15000 - 2900 - 2800 - 250)


def test_trip_curve_interpolation() -> None:
    curve = tree_for().node("rack-1").trip_curve
    assert curve is not None
    assert allowed_s(curve, 1.05) == math.inf
    assert allowed_s(curve, 1.1) == pytest.approx(600.0)
    assert allowed_s(curve, 1.5) == pytest.approx(30.0)
    assert 30.0 < allowed_s(curve, 1.3) < 600.0
    assert allowed_s(curve, 2.0) < 30.0
    assert allowed_s(curve, 5.0) == 0.0


def test_decide_is_pure() -> None:
    tree = tree_for()
    power = uniform(480.0)
    limit = uniform(500.0)
    snap = Snapshot.build(
        tree, 1.0, gpu_power_w=power, gpu_limit_w=limit, node_power_w=meter_readings(tree, power)
    )
    a1, s1 = decide(snap, tree, None)
    a2, s2 = decide(snap, tree, None)
    assert a1 == a2
    assert np.array_equal(s1.target_w, s2.target_w)
    assert np.all(snap.gpu_power_w == 480.0) and np.all(snap.gpu_limit_w == 500.0)
    with pytest.raises(ValueError):
        s1.target_w[0] = 1.0
    b1, t1 = decide(snap, tree, s1)
    b2, t2 = decide(snap, tree, s1)
    assert b1 == b2 and np.array_equal(t1.target_w, t2.target_w)
