"""The detail points (servers, GPUs, jobs, devices) are spread over the cycles of 5 s.

Not only "every 5 s": one cycle in ten building every GPU's point at hall scale would
take about 150 ms of a 0.5 s cycle (docs/tsdb-schema.md). The controller runs in-process
here (no TSDB: the points are read where the writer would take them).
"""

from __future__ import annotations

import collections
import math
import time

from controller.core.controller import Controller
from controller.core.cycle_points import detail_every, phase_of
from controller.core.points import Point
from controller.model.loader import parse_site
from tests.sites import tiny_site


def test_phases_spread_a_hall_evenly() -> None:
    """4,096 GPU servers over ten phases: no cycle gets much more than its tenth."""
    ids = [f"r{r:04d}-n{n}" for r in range(1024) for n in range(4)]
    per_phase = collections.Counter(phase_of(i, 10) for i in ids)
    assert set(per_phase) == set(range(10))
    assert max(per_phase.values()) <= 1.15 * len(ids) / 10


def test_each_gpu_once_per_period_and_never_all_in_one_cycle() -> None:
    cfg = tiny_site()
    for rack in cfg["rows"][0]["racks"]:
        rack["nodes"][0]["count"] = 8  # 16 servers, 64 GPUs
    cfg["policy"] = {"cycle_s": 0.5}
    ctl = Controller(parse_site(cfg), controller_id="ctl", clock=time.monotonic)
    every = detail_every(0.5)
    assert every == 10
    per_cycle: list[list[Point]] = []
    t0 = 1000.0
    for k in range(2 * every):
        per_cycle.append(list(ctl.run_cycle(t0 + k * 0.5).points))
    gpu_cycles: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for k, points in enumerate(per_cycle):
        for p in points:
            if p.measurement == "rackpower_gpu":
                gpu_cycles[(p.tags["node"], p.tags["gpu"])].append(k)
    assert len(gpu_cycles) == len(ctl.tree.gpus) == 64
    for cycles in gpu_cycles.values():
        assert len(cycles) == 2 and cycles[1] - cycles[0] == every
    most = max(sum(p.measurement == "rackpower_gpu" for p in points) for points in per_cycle)
    assert most <= 3 * math.ceil(64 / every)  # spread, not 64 in one cycle
    # The constraint levels, by contrast, are in every cycle.
    racks = [sum(p.tags.get("kind") == "rack" for p in points) for points in per_cycle]
    assert racks == [2] * (2 * every)


def test_violations_are_counted_alike_in_the_tsdb_and_on_metrics() -> None:
    """No readings after the start-up grace: every rack counts at its worst case (8.8 kW
    on a 7 kW envelope), so each cycle is a violation. ``rackpower_envelope_violations``
    on /metrics was never counted before; now it is, with the same number the TSDB's
    ``violations`` carries."""
    ctl = Controller(parse_site(tiny_site()), controller_id="ctl")
    ctl._startup_grace_s = 0.0  # silence is a fault from the first cycle
    written: list[Point] = []
    for k in range(5):
        written.extend(ctl.run_cycle(1000.0 + k * 0.5).points)
    rack1 = [p for p in written if p.measurement == "rackpower_node" and p.tags["node"] == "rack-1"]
    assert [p.fields["violations"] for p in rack1] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(p.fields["over_envelope"] == 1.0 for p in rack1)
    on_metrics = ctl.metrics.registry.get_sample_value(
        "rackpower_envelope_violations_total", {"node": "rack-1"}
    )
    assert on_metrics == 5.0


def test_start_up_is_not_counted_as_a_violation() -> None:
    """Within the start-up grace nothing has reported yet: every node sits at its worst
    case, which is not a violation (no alarm either), in the TSDB or on /metrics."""
    site = parse_site(tiny_site())
    ctl = Controller(site, controller_id="ctl")
    assert ctl._startup_grace_s > 2.0
    # As the poll group reports it before any meter has answered: every device stale.
    ctl.device_health = lambda: {d.id: (True, None) for d in site.devices}
    written: list[Point] = []
    for k in range(4):
        written.extend(ctl.run_cycle(1000.0 + k * 0.5).points)
    rack1 = [p for p in written if p.measurement == "rackpower_node" and p.tags["node"] == "rack-1"]
    assert [p.fields["over_envelope"] for p in rack1] == [1.0] * 4  # the worst case shows
    assert [p.fields["violations"] for p in rack1] == [0.0] * 4  # but is not counted
    on_metrics = ctl.metrics.registry.get_sample_value(
        "rackpower_envelope_violations_total", {"node": "rack-1"}
    )
    assert on_metrics in (None, 0.0)
