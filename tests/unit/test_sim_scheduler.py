"""Simulated scheduler: placement, the policy's job view, requeue/migrate/drain, trips."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from sim.plant import Plant, PlantState, Setpoints
from sim.scheduler import JobView, SchedulerConfig, SimScheduler
from sim.workloads import InferenceServiceSpec, TrainingJobSpec, TrainingProfile
from tests.sites import tiny_site

# Flat power, checkpoints every 30 s of progress that take 2 s, a 1 s startup.
FLAT = TrainingProfile(
    compute_frac=0.9,
    comm_frac=0.9,
    checkpoint_every_s=30.0,
    checkpoint_s=2.0,
    startup_s=1.0,
)
RACK1 = set(range(8))
RACK2 = set(range(8, 16))


def tree() -> PowerTree:
    return PowerTree(parse_site(tiny_site()))


class Loop:
    """Scheduler and plant stepped together the way the scenario runner will."""

    def __init__(self, sched: SimScheduler, site: dict[str, Any] | None = None) -> None:
        self.sched = sched
        self.plant = Plant(sched.tree if site is None else PowerTree(parse_site(site)))
        self.state: PlantState = self.plant.initial_state()
        self.t = 0.0
        self.lost: frozenset[str] = frozenset()

    def run(self, seconds: float, dt: float = 0.1) -> None:
        for _ in range(round(seconds / dt)):
            d = self.sched.demand_w(self.t)
            self.state = self.plant.step(self.state, Setpoints(d, lost_sources=self.lost), dt)
            self.sched.advance(self.t, dt, self.state.gpu_power_w, self.state.dark_gpu)
            self.t = self.state.t_s


def test_job_view_for_the_policy_and_first_fit_placement() -> None:
    sched = SimScheduler(
        tree(),
        [
            TrainingJobSpec("t1", 6, 100.0, profile=FLAT),
            InferenceServiceSpec("svc", 4, gpus_per_replica=2),
            TrainingJobSpec("late", 2, 100.0, submit_s=5.0, profile=FLAT),
        ],
    )
    assert sched.jobs() == ()
    sched.demand_w(0.0)
    views = {v.id: v for v in sched.jobs()}
    assert views["t1"] == JobView("t1", "training", tuple(range(6)), True, True)
    assert views["svc"] == JobView("svc", "inference", (6, 7, 8, 9), False, False)
    assert "late" not in views
    sched.demand_w(5.0)
    assert {v.id: v for v in sched.jobs()}["late"].gpus == (10, 11)
    assert sched.gpu_jobs()[11] == "late"


def test_free_gpus_draw_idle_and_load_step_scales_demand() -> None:
    sched = SimScheduler(tree(), [TrainingJobSpec("t", 8, 100.0, profile=FLAT)])
    d = sched.demand_w(0.0)
    tdp = sched.gpu_tdp_w
    assert d[8:] == pytest.approx(0.12 * tdp[8:])
    assert np.all((d[8:] >= 0.10 * 500) & (d[8:] <= 0.15 * 500))
    d_run = sched.demand_w(2.0)  # after its 1 s startup: flat 90 % of TDP
    assert d_run[:8] == pytest.approx(0.9 * tdp[:8])
    sched.demand_scale = 1.3
    assert sched.demand_w(2.0) == pytest.approx(1.3 * d_run)


def test_requeue_loses_progress_since_last_checkpoint_and_restarts_after_delay() -> None:
    sched = SimScheduler(
        tree(),
        [TrainingJobSpec("t", 8, 1000.0, profile=FLAT)],
        config=SchedulerConfig(requeue_delay_s=10.0),
    )
    loop = Loop(sched)
    loop.run(45.0)  # 1 s startup, checkpoint at 30 s of progress (done at t=33), then 12 s
    p = sched.progress()["t"]
    assert p.progress_s == pytest.approx(42.0, abs=0.15)
    assert sched.requeue("t", loop.t)
    assert sched.jobs() == ()
    p = sched.progress()["t"]
    assert p.state == "queued"
    assert p.progress_s == pytest.approx(30.0, abs=0.15)
    assert p.work.lost_gpu_s == pytest.approx(8 * 12.0, abs=1.5)
    assert sched.events[-1].kind == "requeued"
    assert sched.events[-1].lost_gpu_s == pytest.approx(p.work.lost_gpu_s)
    loop.run(9.9)
    assert sched.jobs() == ()  # still inside the requeue delay
    assert np.all(loop.state.gpu_demand_w == pytest.approx(0.12 * sched.gpu_tdp_w))
    loop.run(0.2)
    assert [v.id for v in sched.jobs()] == ["t"]
    assert sched.migrations == 1
    w = sched.work()
    # the 10 s away count as demanded and not delivered
    assert w["training"].demanded_gpu_s > w["training"].delivered_gpu_s + 8 * 9.5
    assert w["total"].net_gpu_s == pytest.approx(
        w["training"].delivered_gpu_s - w["training"].lost_gpu_s
    )


def test_requeue_during_a_checkpoint_keeps_only_the_previous_one() -> None:
    sched = SimScheduler(tree(), [TrainingJobSpec("t", 8, 1000.0, profile=FLAT)])
    loop = Loop(sched)
    loop.run(32.0)  # checkpoint started at 31 s, ends at 33 s
    assert sched.requeue("t", loop.t)
    assert sched.progress()["t"].progress_s == 0.0


def test_migrate_moves_the_job_away_from_the_named_nodes() -> None:
    sched = SimScheduler(
        tree(),
        [TrainingJobSpec("t", 4, 1000.0, profile=FLAT)],
        config=SchedulerConfig(migrate_delay_s=5.0),
    )
    loop = Loop(sched)
    loop.run(3.0)
    assert set(sched.jobs()[0].gpus) <= RACK1
    assert sched.migrate("t", ["rack-1"], loop.t)
    loop.run(5.1)
    (view,) = sched.jobs()
    assert set(view.gpus) <= RACK2
    assert sched.events[-2].kind == "migrated"
    assert sched.events[-1].kind == "started"
    with pytest.raises(KeyError):
        sched.migrate("t", ["no-such-rack"], loop.t)


def test_non_migratable_jobs_are_refused() -> None:
    sched = SimScheduler(
        tree(),
        [
            TrainingJobSpec("pinned", 4, 100.0, migratable=False, profile=FLAT),
            InferenceServiceSpec("svc", 4),
        ],
    )
    sched.demand_w(0.0)
    assert not sched.requeue("pinned", 1.0)
    assert not sched.migrate("svc", ["rack-1"], 1.0)
    assert len(sched.jobs()) == 2


def test_drain_keeps_new_work_off_and_resume_lets_it_back() -> None:
    sched = SimScheduler(
        tree(),
        [
            TrainingJobSpec("a", 4, 1000.0, profile=FLAT),
            TrainingJobSpec("b", 8, 1000.0, submit_s=1.0, profile=FLAT),
            TrainingJobSpec("c", 4, 1000.0, submit_s=2.0, profile=FLAT),
        ],
    )
    sched.demand_w(0.0)
    sched.drain("rack-2")
    assert sched.drained == {"rack-2"}
    sched.demand_w(1.0)  # b does not fit outside rack-2: waits
    sched.demand_w(2.0)  # c fits in rack-1's other half
    placed = {v.id: set(v.gpus) for v in sched.jobs()}
    assert set(placed) == {"a", "c"}
    assert placed["c"] <= RACK1
    sched.resume("rack-2")
    sched.demand_w(2.1)
    placed = {v.id: set(v.gpus) for v in sched.jobs()}
    assert placed["b"] == RACK2


def test_queue_is_served_by_priority_class_then_fifo() -> None:
    sched = SimScheduler(
        tree(),
        [
            TrainingJobSpec("batch", 8, 1000.0, priority_class="batch", profile=FLAT),
            TrainingJobSpec("crit", 8, 1000.0, priority_class="critical", profile=FLAT),
            TrainingJobSpec("train", 8, 1000.0, profile=FLAT),
        ],
    )
    sched.demand_w(0.0)
    assert {v.id for v in sched.jobs()} == {"crit", "train"}


def test_a_trip_fails_the_jobs_below_it_and_they_restart_elsewhere() -> None:
    site = tiny_site()
    site["trip_curves"]["fast"] = {"points": [[1.1, 5.0], [1.5, 1.0]], "instant_ratio": 3.0}
    rack = site["rows"][0]["racks"][0]
    del rack["count"], rack["meters"]
    hot = {**rack, "id": "rack-1", "rating_w": 2000, "envelope_w": 1800, "trip_curve": "fast"}
    hot["nodes"] = [{**rack["nodes"][0], "envelope_w": 800}]
    site["rows"][0]["racks"] = [hot, {**rack, "id": "rack-2"}]
    t = PowerTree(parse_site(site))
    sched = SimScheduler(
        t,
        [
            TrainingJobSpec("hot", 8, 1000.0, profile=FLAT),
            TrainingJobSpec("small", 2, 1000.0, submit_s=60.0, profile=FLAT),
        ],
        config=SchedulerConfig(requeue_delay_s=3.0),
    )
    loop = Loop(sched)
    loop.plant = Plant(t)
    loop.state = loop.plant.initial_state()
    loop.run(40.0)  # 8 x 450 W + baselines into a 2 kW rack: trips within seconds
    assert [e.element_id for e in loop.state.trips] == ["rack-1"]
    fails = [e for e in sched.events if e.kind == "failed"]
    assert [e.job_id for e in fails] == ["hot"]
    assert fails[0].lost_gpu_s > 0
    # rack-1 is dark, so the job came back on rack-2 after the delay
    (view,) = sched.jobs()
    assert set(view.gpus) == RACK2
    loop.run(25.0)  # "small" arrives: only dark GPUs are free, so it waits
    assert [v.id for v in sched.jobs()] == ["hot"]
    loop.state = loop.plant.reclose(loop.state, ["rack-1"])
    loop.run(0.2)
    assert {v.id: set(v.gpus) for v in sched.jobs()}["small"] <= RACK1


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=6),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["requeue", "migrate", "drain", "resume", "wait"]),
            st.integers(0, 5),
            st.sampled_from(["rack-1", "rack-2", "rack-1-n1", "rack-2-n2"]),
        ),
        max_size=12,
    ),
)
def test_placements_never_overlap_and_never_start_on_drained_gpus(
    sizes: list[int], ops: list[tuple[str, int, str]]
) -> None:
    t = tree()
    sched = SimScheduler(
        t,
        [TrainingJobSpec(f"j{i}", n, 1000.0, profile=FLAT) for i, n in enumerate(sizes)],
        config=SchedulerConfig(requeue_delay_s=1.0, migrate_delay_s=1.0),
    )
    now = 0.0
    held: dict[str, tuple[int, ...]] = {}
    for op, k, node in ops:
        job = f"j{k % len(sizes)}"
        if op == "requeue":
            sched.requeue(job, now)
        elif op == "migrate":
            sched.migrate(job, [node], now)
        elif op == "drain":
            sched.drain(node)
        elif op == "resume":
            sched.resume(node)
        now += 0.7
        sched.demand_w(now)
        drained = np.zeros(16, dtype=bool)
        for d in sched.drained:
            a, b = t.gpu_range(d)
            drained[a:b] = True
        gpus = [g for v in sched.jobs() for g in v.gpus]
        assert len(gpus) == len(set(gpus))
        for v in sched.jobs():
            if held.get(v.id) != v.gpus:  # (re)started now: not on a drained GPU
                assert not drained[list(v.gpus)].any()
        held = {v.id: v.gpus for v in sched.jobs()}
