"""The capacity benchmark's machinery (benchmarks/capacity.py), not its figures.

The sweep itself is a benchmark (minutes); here one point of 60 s runs through the real
scenario runner and every policy, and the judging function is checked on hand-made points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import capacity
from controller.model.topology import PowerTree


def _point(x: float, trips: int = 0, i2t: float = 0.0, slow: float = 0.0) -> dict[str, Any]:
    return {"oversubscription": x, "trips": trips, "worst_i2t_pct": i2t, "slowdown_pct": slow}


def test_max_oversubscription_is_the_last_point_of_the_holding_run() -> None:
    pts = [_point(1.2, slow=2.9), _point(1.0), _point(1.1, slow=3.0)]  # unsorted on purpose
    assert capacity.max_oversubscription(pts) == 1.2
    # Each criterion alone breaks the run; a point holding above a failure does not count.
    for bad in (_point(1.2, trips=1), _point(1.2, i2t=100.0), _point(1.2, slow=3.01)):
        pts = [_point(1.0), _point(1.1), bad, _point(1.3), _point(1.4)]
        assert capacity.max_oversubscription(pts) == 1.1, bad
    assert capacity.max_oversubscription([_point(1.0, trips=2), _point(1.1)]) is None
    assert capacity.max_oversubscription([]) is None
    assert capacity.max_oversubscription([_point(1.0, i2t=99.9)]) == 1.0


def test_slowdown_is_a_mean_over_jobs_of_each_types_shortfall() -> None:
    uncapped = {"training": 1000.0, "inference": 400.0, "batch": 100.0, "total": 1500.0}
    work = {"training": 900.0, "inference": 400.0, "batch": 50.0, "total": 1350.0}
    mean, per_type = capacity.slowdown_pct(work, uncapped, {"training": 3, "inference": 1})
    assert per_type == pytest.approx({"training": 10.0, "inference": 0.0})  # no batch jobs
    assert mean == pytest.approx(7.5)  # (3 x 10 + 1 x 0) / 4


def test_the_lowest_class_present_may_pay_in_the_second_reading() -> None:
    per_type = {"training": 1.0, "inference": 5.0, "batch": 60.0}
    jobs = {"training": 3, "inference": 1, "batch": 2}
    assert capacity.slowdown_above_lowest_pct(per_type, jobs) == pytest.approx(2.0)  # (3+5)/4
    # Without batch jobs, inference is the lowest class present and pays.
    assert capacity.slowdown_above_lowest_pct(
        {"training": 1.0, "inference": 5.0}, jobs
    ) == pytest.approx(1.0)
    assert capacity.slowdown_above_lowest_pct({"training": 4.0}, jobs) == 0.0
    point = {
        "trips": 0,
        "worst_i2t_pct": 0.0,
        "slowdown_pct": 20.0,
        "slowdown_above_lowest_pct": 2.0,
    }
    assert not capacity.holds(point) and capacity.holds_above_lowest(point)


@pytest.mark.parametrize("x", [1.0, 1.5, 2.0])
def test_hall_envelopes_stay_fixed_while_racks_are_added(x: float) -> None:
    scenario = capacity.capacity_scenario(x, 60.0)
    tree = PowerTree(scenario.site)
    racks = tree.of_kind("rack")
    assert len(racks) == capacity.racks_at(x)
    # The row and hall envelopes are the nameplate of RACKS_AT_NAMEPLATE racks through
    # full-load losses, whatever the rack count; each rack's own envelope is its own.
    ref = PowerTree(capacity.capacity_scenario(1.0, 60.0).site)
    for nid in ("mv-1", "sst-1", "bus-800v", "row-1", "row-2"):
        assert tree.node(nid).envelope_w == ref.node(nid).envelope_w
    assert 0.9 < ref.oversubscription("bus-800v") < 1.0  # the fit, with loss headroom
    assert tree.oversubscription("bus-800v") == pytest.approx(
        x * ref.oversubscription("bus-800v"), rel=1e-3
    )
    for rack in racks:
        assert 0.9 < tree.oversubscription(rack) < 1.0
    relaxed = PowerTree(capacity.capacity_scenario(x, 60.0, relaxed=True).site)
    assert relaxed.node("mv-1").envelope_w == pytest.approx(
        capacity.RELAXED * tree.node("mv-1").envelope_w, rel=1e-6
    )


def test_one_point_sweep_writes_the_documented_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "cap.json", tmp_path / "cap.png"
    rc = capacity.main(
        ["--json", str(out), "--png", str(png), "--points", "1.0", "--duration-s", "60",
         "--processes", "1"]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert set(doc["policies"]) == set(capacity.POLICIES)
    for name, pol in doc["policies"].items():
        assert isinstance(pol["max_oversubscription"], float | None), name
        [p] = pol["points"]
        assert p["oversubscription"] == 1.0
        assert isinstance(p["trips"], int)
        for key in ("seconds_over_envelope", "slowdown_pct", "work_delivered"):
            assert isinstance(p[key], float | int), (name, key)
        assert p["work_delivered"] > 0
    # At the nameplate fit static's caps are every GPU's maximum: it must deliver exactly
    # the uncapped reference's work, or the reference is not the same world.
    static = doc["policies"]["static"]["points"][0]
    assert static["work_delivered"] == static["work_uncapped"]
    assert static["slowdown_pct"] == 0.0
    assert doc["policies"]["static"]["max_oversubscription"] == 1.0
    assert 30.0 <= doc["mean_draw_pct_of_provisioned"] <= 60.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
