"""Baseline policies, the registry, and building snapshot fields from readings."""

from __future__ import annotations

import numpy as np

from controller.policy import POLICIES, Job, SetCap, get_policy, node_power_from_readings
from controller.policy.baselines import none_policy, static_policy, three_band_policy
from drivers.reading import Quality, Reading
from tests.helpers.policy_support import Run, tree_for


def test_registry_names_every_policy() -> None:
    assert set(POLICIES) == {"rackpower", "none", "static", "three-band"}
    assert get_policy("static") is static_policy
    try:
        get_policy("dynamo")
    except KeyError as exc:
        assert "rackpower" in str(exc)
    else:
        raise AssertionError("unknown names must fail")


def test_none_never_caps() -> None:
    run = Run(tree_for(), policy=none_policy)
    run.repeat(5, lambda _: np.full(16, 500.0))
    assert run.cap_changes() == 0
    assert np.all(run.limit_w == 500.0)


def test_static_caps_every_gpu_at_its_share_whatever_the_load() -> None:
    run = Run(tree_for(), policy=static_policy)
    run.step(np.full(16, 120.0))
    # (3800 - 400) / 8 = 425 W per GPU in each rack; the row allows more.
    assert np.all(run.limit_w == 425.0)
    run.repeat(5, lambda _: np.full(16, 500.0))
    assert run.cap_changes(since=1) == 0
    acts = run.step(np.full(16, 500.0), envelope_override_w={"rack-2": 3000.0})
    assert np.all(run.limit_w[8:] == 325.0)
    assert all(a.node_id == "rack-2" and "static share" in a.reason for a in acts)


def test_three_band_acts_every_3_s_per_gpu_lowest_priority_highest_draw_first() -> None:
    jobs = (Job("t", "training", (0, 1, 2, 3)), Job("b", "batch", (4, 5, 6, 7)))
    run = Run(tree_for(), jobs=jobs, policy=three_band_policy)
    demand = np.full(16, 300.0)
    demand[:8] = [450, 450, 450, 450, 460, 470, 480, 490]  # rack-1: 4100 W
    run.step(demand)  # t = 0: first sample acts
    caps = run.limit_w
    assert np.all(caps[:4] == 500.0), "training untouched while batch can give"
    # Need 4100 - 3572 = 528 W: 490 -> 100 (390 W), then 480 -> 342 (138 W).
    assert caps[7] == 100.0 and caps[6] == 342.0
    assert np.all(caps[4:6] == 500.0), "not job-aware: one job, different caps"
    for _ in range(5):  # t = 0.5 .. 2.5: no new sample
        assert run.step(demand) == []
    run.step(demand)  # t = 3.0
    assert run.state is not None and run.state.now_s == 3.0


def test_three_band_releases_in_steps() -> None:
    run = Run(tree_for(), policy=three_band_policy)
    run.step(np.full(16, 480.0))
    low = run.limit_w.copy()
    assert low.min() < 480.0
    for _ in range(7):
        run.step(np.full(16, 100.0))
    assert np.all(run.limit_w >= low)
    assert run.limit_w.min() < 500.0 or run.cap_changes(since=1) > 0
    assert any(isinstance(a, SetCap) for acts in run.actions[1:] for a in acts)


def test_node_power_from_readings_sums_meters_and_marks_unusable() -> None:
    tree = tree_for()

    def reading(device: str, point: str, value: float, ts: float, q: Quality) -> Reading:
        return Reading(device, point, value, "W", ts, 1e9 + ts, q)

    readings = {
        ("sst-meter", "input_power_w"): reading(
            "sst-meter", "input_power_w", 9000.0, 99.5, Quality.GOOD
        ),
        ("pdu-1", "power_w"): reading("pdu-1", "power_w", 3000.0, 99.0, Quality.GOOD),
        ("pdu-2", "power_w"): reading("pdu-2", "power_w", 3100.0, 80.0, Quality.GOOD),
    }
    out = node_power_from_readings(tree, readings, now_s=100.0)
    assert out["feed"] == 9000.0
    assert out["rack-1"] == 3000.0
    assert out["rack-2"] is None  # 20 s old, stale after 3 s
    readings[("pdu-1", "power_w")] = reading("pdu-1", "power_w", 1.0, 99.9, Quality.BAD)
    assert node_power_from_readings(tree, readings, now_s=100.0)["rack-1"] is None
    assert "row" not in out  # unmetered
