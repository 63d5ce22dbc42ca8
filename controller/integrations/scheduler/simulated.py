"""The simulator's scheduler behind the adapter Protocol (``base.SchedulerAdapter``).

The demo and the scenarios join the controller to the simulator; through this adapter
the daemon's escalation reaches the simulated cluster by the same interface, and the
same mapping, as it reaches Slurm or Kubernetes, so a scenario exercises the code path a
site runs. The controller must not import :mod:`sim` (dependencies point one way), so
the scheduler object comes in as a constructor argument typed by :class:`SimSchedulerLike`,
the few methods of :class:`sim.scheduler.SimScheduler` used here.

Names: hosts are the power tree's GPU server ids (the simulator has no other names, so
:class:`~controller.integrations.scheduler.mapping.HostMap`'s identity default fits), class labels
the job's priority class (already a controller class). Time: the simulator's actions
take ``now_s`` on its own clock, which ``clock`` reads (the scenario's step time, or the
live runtime's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from controller.integrations.scheduler.base import ActionRefused, JobNotFound, MoveOutcome, SchedJob
from controller.model.topology import PowerTree
from controller.policy.types import Job


class SimSchedulerLike(Protocol):
    """What the adapter uses of :class:`sim.scheduler.SimScheduler`."""

    @property
    def tree(self) -> PowerTree: ...

    def jobs(self) -> tuple[Job, ...]: ...

    def requeue(self, job_id: str, now_s: float) -> bool: ...

    def migrate(self, job_id: str, away_from_node_ids: Sequence[str], now_s: float) -> bool: ...

    def drain(self, node_id: str) -> None: ...

    def resume(self, node_id: str) -> None: ...


@dataclass(frozen=True)
class SimNote:
    """What the adapter was told about a job (the simulator has nowhere to keep it)."""

    t_s: float
    job_id: str
    text: str


class SimulatedScheduler:
    """:class:`~.base.SchedulerAdapter` over a simulated cluster."""

    name = "sim"

    def __init__(self, sched: SimSchedulerLike, clock: Callable[[], float]) -> None:
        self.sched = sched
        self.clock = clock
        self.notes: list[SimNote] = []
        self.drains: dict[str, str] = {}  # host -> the reason given, while drained

    async def aclose(self) -> None:
        return None

    def _sched_job(self, job: Job) -> SchedJob:
        tree = self.sched.tree
        local: dict[str, list[int]] = {}
        for g in job.gpus:
            info = tree.gpus[g]
            first, _ = tree.gpu_range(info.node)
            local.setdefault(info.node, []).append(g - first)
        return SchedJob(
            id=job.id,
            hosts=tuple(local),
            class_labels=(job.priority_class,),
            local_gpus=tuple(tuple(v) for v in local.values()),
            requeueable=job.migratable,  # the simulator's flag: consent to being moved
            migratable=job.migratable,  # it restarts elsewhere from its last checkpoint
            synchronous=job.synchronous,
            state="running",
            name=job.id,
        )

    async def jobs(self) -> Sequence[SchedJob]:
        return tuple(self._sched_job(j) for j in self.sched.jobs())

    def _running(self, job_id: str) -> Job:
        for job in self.sched.jobs():
            if job.id == job_id:
                if not job.migratable:
                    raise ActionRefused(f"sim: job {job_id} may not be moved (not migratable)")
                return job
        raise JobNotFound(f"sim: job {job_id} is not running")

    async def requeue(self, job_id: str, reason: str) -> None:
        self._running(job_id)
        now_s = self.clock()
        if not self.sched.requeue(job_id, now_s):
            raise ActionRefused(f"sim: requeue of {job_id} refused")
        self.notes.append(SimNote(now_s, job_id, f"requeued: {reason}"))

    async def migrate(
        self, job_id: str, away_from_hosts: Sequence[str], reason: str
    ) -> MoveOutcome:
        self._running(job_id)
        self._known(away_from_hosts)
        now_s = self.clock()
        if not self.sched.migrate(job_id, list(away_from_hosts), now_s):
            raise ActionRefused(f"sim: migration of {job_id} refused")
        self.notes.append(
            SimNote(now_s, job_id, f"migrated away from {', '.join(away_from_hosts)}: {reason}")
        )
        return "migrated"

    def _known(self, hosts: Sequence[str]) -> None:
        tree = self.sched.tree
        unknown = [h for h in hosts if h not in tree]
        if unknown:
            raise ActionRefused(f"sim: no such node(s): {', '.join(unknown)}")

    async def drain(self, hosts: Sequence[str], reason: str) -> None:
        self._known(hosts)
        for host in hosts:
            self.sched.drain(host)
            self.drains[host] = reason

    async def resume(self, hosts: Sequence[str]) -> None:
        self._known(hosts)
        for host in hosts:
            self.sched.resume(host)
            self.drains.pop(host, None)

    async def drained(self) -> dict[str, str]:
        return dict(self.drains)

    async def note(self, job_id: str, text: str) -> None:
        self.notes.append(SimNote(self.clock(), job_id, text))
