"""The daemon's escalation path: policy -> scheduler link -> adapter, audited and alarmed.

The adapter here is a small in-memory stand-in speaking controller.integrations.scheduler.base's
interface (the real Slurm and Kubernetes adapters are tested against a real Slurm and a
fake API server in tests/integration); what this checks is the daemon's wiring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Literal

from controller.agentlink.lease import Telemetry
from controller.core.alarms import Alarm, AlarmKind
from controller.core.controller import Controller
from controller.integrations.scheduler.attach import attach_scheduler
from controller.integrations.scheduler.base import SchedJob, SchedulerUnavailable
from controller.integrations.scheduler.runner import ActionResult, SchedulerLink
from controller.model.config import SchedulerConfig, Site
from controller.model.loader import parse_site
from controller.model.topology import PowerTree
from controller.policy import Requeue
from drivers.reading import Quality, Reading
from tests.sites import tiny_site, with_rack_agents


class MemoryScheduler:
    name = "memory"

    def __init__(self, jobs: Sequence[SchedJob], drained: dict[str, str] | None = None) -> None:
        self.running = list(jobs)
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.left_drained = dict(drained or {})
        self.notes: list[tuple[str, str]] = []

    async def jobs(self) -> Sequence[SchedJob]:
        if self.down:
            raise SchedulerUnavailable("memory scheduler is down")
        return tuple(self.running)

    async def requeue(self, job_id: str, reason: str) -> None:
        self.calls.append(("requeue", job_id))
        self.running = [j for j in self.running if j.id != job_id]

    async def migrate(
        self, job_id: str, away_from_hosts: Sequence[str], reason: str
    ) -> Literal["migrated", "requeued"]:
        await self.requeue(job_id, reason)
        return "requeued"

    async def drain(self, hosts: Sequence[str], reason: str) -> None:
        self.calls += [("drain", h) for h in hosts]

    async def resume(self, hosts: Sequence[str]) -> None:
        self.calls += [("resume", h) for h in hosts]
        for h in hosts:
            self.left_drained.pop(h, None)

    async def drained(self) -> dict[str, str]:
        if self.down:
            raise SchedulerUnavailable("memory scheduler is down")
        return dict(self.left_drained)

    async def note(self, job_id: str, text: str) -> None:
        self.calls.append(("note", job_id))
        self.notes.append((job_id, text))

    async def aclose(self) -> None:
        pass


CFG = SchedulerConfig(
    kind="none", class_map={"high": "training", "low": "batch"}, poll_s=0.05, resume_hold_s=0.2
)


def site_with_agents() -> Site:
    cfg = tiny_site()
    with_rack_agents(cfg)
    return parse_site(cfg)


def overloaded(controller: Controller, now: float) -> None:
    """rack-1 reads 12 kW against 7 kW: more than its GPUs at floor could ever clear."""
    wall = time.time()
    for info in controller.agents.values():
        n = info.stop - info.first
        controller.accept_telemetry(
            Telemetry(
                agent_id=info.agent_id,
                node_id=info.node_id,
                ts=wall,
                failsafe=False,
                power_w=[500.0] * n,
                power_avg_w=[500.0] * n,
                limit_w=[500.0] * n,
                min_w=[100.0] * n,
                max_w=[500.0] * n,
                q=[Quality.GOOD] * n,
            ),
            received_s=now,
        )
    controller.accept_readings(
        [
            Reading("sst-meter", "input_power_w", 17000.0, "W", now, wall),
            Reading("pdu-1", "power_w", 12000.0, "W", now, wall),
            Reading("pdu-2", "power_w", 3000.0, "W", now, wall),
        ]
    )


async def test_sustained_overload_requeues_one_low_job_drains_and_alarms() -> None:
    controller = Controller(site_with_agents(), controller_id="ctl")
    alarms: list[Alarm] = []
    jobs = [
        SchedJob("train", ("rack-1-n1",), ("high",), requeueable=True),
        SchedJob("batch", ("rack-1-n2",), ("low",), requeueable=True),
        SchedJob("pinned", ("rack-2-n1",), ("low",), requeueable=False),
    ]
    sched = MemoryScheduler(jobs)
    link = attach_scheduler(controller, sched, CFG)
    task = asyncio.create_task(link.run(asyncio.Event()))
    try:
        await asyncio.sleep(0.2)  # first poll
        assert controller.jobs_provider is not None  # attach_scheduler set it
        assert {j.id for j in controller.jobs_provider()} == {"train", "batch", "pinned"}
        t0 = time.monotonic()
        for k in range(400):  # sustained: past the escalation's min_interval_s (120 s)
            now = t0 + k * 0.5
            overloaded(controller, now)
            result = controller.run_cycle(now)
            link.publish(result)  # what the service does with each cycle's result
            alarms.extend([*result.alarms, *result.notices])
            await asyncio.sleep(0)
            if ("requeue", "batch") in sched.calls:
                break
        await asyncio.sleep(0.3)
        # The escalation's outcome goes out with the next cycle's result.
        alarms.extend(controller.run_cycle(now + 0.5).notices)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [c for c in sched.calls if c[0] == "requeue"] == [("requeue", "batch")]
    assert ("drain", "rack-1-n1") in sched.calls and ("drain", "rack-1-n2") in sched.calls
    kinds = [e.kind for e in controller.audit.recent(limit=500)]
    assert "requeue" in kinds or "migrate" in kinds  # the policy's decision, with its reason
    assert "scheduler:requeued" in kinds and "scheduler:drained" in kinds
    assert any(a.kind is AlarmKind.ESCALATION and a.subject == "batch" for a in alarms)
    # The capped jobs were told why (once: the overload lasted under the note interval);
    # the moved one's last note is the move's reason, not a cap note.
    train_notes = [t for j, t in sched.notes if j == "train"]
    assert len(train_notes) == 1 and train_notes[0].startswith("rackpower: capped to ")
    assert "rack-1:" in train_notes[0]
    batch_notes = [t for j, t in sched.notes if j == "batch"]
    assert "even with every GPU at its floor" in batch_notes[-1]


async def test_unreachable_scheduler_falls_back_and_alarms() -> None:
    controller = Controller(parse_site(tiny_site()), controller_id="ctl")
    sched = MemoryScheduler([])
    sched.down = True
    cfg = CFG.model_copy(update={"stale_after_s": 0.1})
    link = attach_scheduler(controller, sched, cfg)
    task = asyncio.create_task(link.run(asyncio.Event()))
    try:
        await asyncio.sleep(0.4)
        assert controller.jobs_provider is not None  # attach_scheduler set it
        jobs = controller.jobs_provider()
        assert jobs and all(j.id.startswith("server:") for j in jobs)
        assert controller.alarm_sources[0](time.time())[0].kind is AlarmKind.ESCALATION
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_drains_left_by_an_earlier_run_are_adopted_then_resumed() -> None:
    """A controller restarted while rack-1 was drained: the new link finds the drain by
    the node its reason names, reports it (the daemon audits it as ``scheduler:adopted``)
    and resumes it once rack-1's headroom holds, as if it had drained it itself. One of
    ours whose reason names no node is kept under its own server."""
    tree = PowerTree(parse_site(tiny_site()))
    sched = MemoryScheduler(
        [],
        drained={
            "rack-1-n1": "rackpower: rack-1: 12.0 kW even with every GPU at its floor",
            "rack-1-n2": "rackpower: rack-1: 12.0 kW even with every GPU at its floor",
            "rack-2-n2": "rackpower: by hand",
        },
    )
    room = {"rack-1": -100.0, "rack-2-n2": -100.0}
    results: list[ActionResult] = []
    link = SchedulerLink(
        sched, tree, CFG, headroom_w=room.get, on_result=results.append, resume_hold_s=0.0
    )
    assert await link.refresh()
    await link.adopt_drains()
    assert link.status().drained == ("rack-1", "rack-2-n2")
    assert [(r.target, r.hosts, r.outcome) for r in results] == [
        ("rack-1", ("rack-1-n1", "rack-1-n2"), "adopted"),
        ("rack-2-n2", ("rack-2-n2",), "adopted"),
    ]
    link.check_drains()
    await link.drain_queue()
    assert not [c for c in sched.calls if c[0] == "resume"]  # no headroom: still drained
    room["rack-1"] = 500.0
    link.check_drains()
    await link.drain_queue()
    assert sorted(c for c in sched.calls if c[0] == "resume") == [
        ("resume", "rack-1-n1"),
        ("resume", "rack-1-n2"),
    ]
    assert link.status().drained == ("rack-2-n2",)


async def test_cap_notes_are_rate_limited_and_never_replace_a_move_note() -> None:
    """First cap: a note; more cap changes within the interval: none; released: a note;
    a job never capped: no release note; a job just moved: no cap note over its move's."""
    tree = PowerTree(parse_site(tiny_site()))
    now = [0.0]
    sched = MemoryScheduler([SchedJob("j", ("rack-1-n1",), ("low",), requeueable=True)])
    cfg = CFG.model_copy(update={"note_caps_every_s": 300.0})
    link = SchedulerLink(sched, tree, cfg, clock=lambda: now[0])
    assert link.note_cap("j", True, "capped to 300 W per GPU: rack-1: over")
    assert not link.note_cap("j", True, "capped to 280 W per GPU: rack-1: over")
    await link.send_notes()
    assert sched.notes == [("j", "rackpower: capped to 300 W per GPU: rack-1: over")]
    now[0] = 100.0
    assert not link.note_cap("j", True, "capped to 250 W per GPU")
    assert link.note_cap("j", False, "no longer capped")  # a change of state: at once
    assert not link.note_cap("k", False, "no longer capped")  # never capped
    now[0] = 500.0
    assert link.note_cap("j", True, "capped to 250 W per GPU")  # the interval is over
    await link.send_notes()
    assert [t for _, t in sched.notes][1:] == ["rackpower: capped to 250 W per GPU"]
    # A move: the queued cap note is dropped, and none follows for the interval.
    now[0] = 900.0
    assert link.note_cap("j", False, "no longer capped")
    assert await link.refresh()
    why = "rack-1: 9 kW even with every GPU at its floor"
    assert link.submit_action(Requeue("j", "rack-1", why))
    assert not link.note_cap("j", True, "capped to 200 W per GPU")
    await link.drain_queue()
    await link.send_notes()
    assert sched.notes[-1] == ("j", f"rackpower: {why}")
    now[0] = 1000.0
    assert not link.note_cap("j", True, "capped to 200 W per GPU")
