"""The simulator's scheduler behind the adapter interface.

A real :class:`sim.scheduler.SimScheduler` on the tiny site (two racks of two 4-GPU
servers, GPUs 0-3, 4-7 | 8-11, 12-15 in tree order); every test reads back the
simulator's own state (its job view, events, progress, drained set) after acting
through the adapter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from controller.integrations.scheduler.base import (
    ActionRefused,
    JobNotFound,
    SchedJob,
    SchedulerAdapter,
)
from controller.integrations.scheduler.mapping import HostMap, map_jobs
from controller.integrations.scheduler.simulated import SimNote, SimulatedScheduler
from controller.model.config import PolicyConfig
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from sim.scheduler import SchedulerConfig, SimScheduler
from sim.workloads import InferenceServiceSpec, TrainingJobSpec, TrainingProfile
from tests.helpers.clock import ManualClock
from tests.sites import tiny_site

FLAT = TrainingProfile(
    compute_frac=0.9, comm_frac=0.9, checkpoint_every_s=30.0, checkpoint_s=2.0, startup_s=1.0
)
RACK1 = ("rack-1-n1", "rack-1-n2")


@pytest.fixture
def sched() -> SimScheduler:
    s = SimScheduler(
        PowerTree(parse_site(tiny_site())),
        [
            TrainingJobSpec("t1", 6, 1000.0, profile=FLAT),  # GPUs 0-5: two servers
            InferenceServiceSpec("svc", 4, gpus_per_replica=2, arrivals="poisson"),  # 6-9
            TrainingJobSpec("b1", 2, 1000.0, priority_class="batch", profile=FLAT),  # 10-11
        ],
        config=SchedulerConfig(requeue_delay_s=60.0, migrate_delay_s=30.0),
    )
    s.demand_w(0.0)  # places the jobs due at t=0
    return s


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def adapter(sched: SimScheduler, clock: ManualClock) -> SimulatedScheduler:
    return SimulatedScheduler(sched, clock)


def gpus_of(sched: SimScheduler, job_id: str) -> tuple[int, ...]:
    return sched.progress()[job_id].gpus


async def test_jobs_map_to_the_interface(adapter: SimulatedScheduler, sched: SimScheduler) -> None:
    assert isinstance(adapter, SchedulerAdapter)
    jobs = {j.id: j for j in await adapter.jobs()}
    assert jobs["t1"] == SchedJob(
        id="t1",
        hosts=("rack-1-n1", "rack-1-n2"),
        class_labels=("training",),
        local_gpus=((0, 1, 2, 3), (0, 1)),
        requeueable=True,
        migratable=True,
        synchronous=True,
        state="running",
        name="t1",
    )
    svc = jobs["svc"]  # across racks: two GPUs on rack-1-n2, two on rack-2-n1
    assert (svc.hosts, svc.local_gpus) == (("rack-1-n2", "rack-2-n1"), ((2, 3), (0, 1)))
    assert (svc.synchronous, svc.requeueable, svc.class_labels) == (False, False, ("inference",))
    assert (jobs["b1"].hosts, jobs["b1"].class_labels) == (("rack-2-n1",), ("batch",))
    # Through the site's mapping the controller gets back exactly the simulator's view.
    tree = sched.tree
    mapped = map_jobs(jobs.values(), tree, HostMap(tree), {}, PolicyConfig())
    assert sorted(mapped.jobs, key=lambda j: j.id) == sorted(sched.jobs(), key=lambda j: j.id)


async def test_requeue_reaches_the_simulator(
    adapter: SimulatedScheduler, sched: SimScheduler, clock: ManualClock
) -> None:
    clock.now_s = 12.5
    await adapter.requeue("t1", "rack-1 over at the floor")
    ev = sched.events[-1]
    assert (ev.t_s, ev.job_id, ev.kind, ev.gpus) == (12.5, "t1", "requeued", (0, 1, 2, 3, 4, 5))
    assert sched.progress()["t1"].state == "queued"
    assert "t1" not in {j.id for j in await adapter.jobs()}
    assert adapter.notes == [SimNote(12.5, "t1", "requeued: rack-1 over at the floor")]
    sched.demand_w(12.5 + 60.0)  # after the requeue delay it runs again
    assert sched.progress()["t1"].state == "running"


async def test_migrate_restarts_away_from_the_named_server(
    adapter: SimulatedScheduler, sched: SimScheduler, clock: ManualClock
) -> None:
    clock.now_s = 5.0
    assert await adapter.migrate("t1", ["rack-1-n1"], "rack-1 over") == "migrated"
    assert (sched.events[-1].job_id, sched.events[-1].kind) == ("t1", "migrated")
    sched.demand_w(5.0 + 30.0)
    gpus = gpus_of(sched, "t1")
    assert len(gpus) == 6 and not set(gpus) & {0, 1, 2, 3}


async def test_drain_keeps_new_work_off_until_resumed(
    adapter: SimulatedScheduler, sched: SimScheduler, clock: ManualClock
) -> None:
    await adapter.drain(list(RACK1), "rack-1 over its envelope")
    assert sched.drained == frozenset(RACK1)
    assert await adapter.drained() == dict.fromkeys(RACK1, "rack-1 over its envelope")
    assert gpus_of(sched, "svc") == (6, 7, 8, 9)  # running work stays where it is
    clock.now_s = 1.0
    await adapter.requeue("t1", "rack-1 over")
    # Outside rack-1 only GPUs 12-15 are free: t1 (6 GPUs) must wait, not return.
    sched.demand_w(100.0)
    assert sched.progress()["t1"].state == "queued"
    await adapter.resume(list(RACK1))
    assert sched.drained == frozenset()
    assert await adapter.drained() == {}
    sched.demand_w(101.0)
    assert sched.progress()["t1"].state == "running"


async def test_refusals(adapter: SimulatedScheduler, sched: SimScheduler) -> None:
    before = len(sched.events)
    with pytest.raises(ActionRefused, match="not migratable"):
        await adapter.requeue("svc", "x")
    with pytest.raises(JobNotFound):
        await adapter.requeue("no-such-job", "x")
    await adapter.requeue("b1", "x")
    with pytest.raises(JobNotFound):  # queued now: nothing to move
        await adapter.migrate("b1", ["rack-2-n1"], "x")
    with pytest.raises(ActionRefused, match="no such node"):
        await adapter.drain(["rack-9-n9"], "x")
    assert [e.kind for e in sched.events[before:]] == ["requeued"]
    assert sched.drained == frozenset()


async def test_note_is_kept(adapter: SimulatedScheduler, clock: ManualClock) -> None:
    clock.now_s = 3.0
    await adapter.note("t1", "capped to 350 W per GPU")
    assert adapter.notes == [SimNote(3.0, "t1", "capped to 350 W per GPU")]


def test_adapter_module_does_not_import_the_simulator() -> None:
    code = (
        "import sys, controller.integrations.scheduler.simulated;"
        "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
