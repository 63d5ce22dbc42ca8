"""The one interface the controller uses to talk to a job scheduler (Slurm, Kubernetes, sim).

Every scheduler is different; what the controller needs from any of them is small: which
jobs run on which GPU servers (to cap a synchronous job as one unit across racks), and a
few escalation verbs (requeue or move a job, keep new work off servers and let it back,
leave a note on a job saying why). An adapter speaks its scheduler's own names: hosts
as the scheduler names GPU servers, classes as its QOS/partition/priority class. Turning
those into the power tree's node ids and the policy's priority classes is
:mod:`controller.integrations.scheduler.mapping`'s job, so adapters stay thin and testable.

Adapters are async and may be slow or down; the control cycle never awaits them (see
:class:`controller.integrations.scheduler.runner.SchedulerLink`, which polls and serves the
last good list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

#: Lifecycle as the controller cares about it; adapters fold their scheduler's states in.
#: Only ``running`` jobs draw power and become policy jobs.
JobState = Literal["running", "pending", "suspended", "completing", "other"]

#: What :meth:`SchedulerAdapter.migrate` did: moved the job, or (the scheduler cannot
#: migrate) stopped and requeued it with the servers excluded.
MoveOutcome = Literal["migrated", "requeued"]


@dataclass(frozen=True)
class SchedJob:
    """A job as the scheduler reports it, before mapping onto the power tree.

    ``hosts`` are GPU server names as the scheduler knows them. ``gpus_per_host`` is how
    many GPUs the job holds on each host (None: all of them, the usual case for training);
    ``local_gpus``, when the scheduler tells (Slurm's ``gres_detail``, a device plugin),
    gives each host's GPU indices on that server, aligned with ``hosts``, and wins over
    the count. ``class_labels`` are the scheduler's own class names in order of
    preference (Slurm: QOS then partition; Kubernetes: priorityClassName), mapped to the
    controller's classes by config. ``requeueable``: the owner consents to the job being
    stopped and queued again; ``migratable``: the scheduler can move it while it runs (or
    checkpoint-restart it elsewhere).
    """

    id: str
    hosts: tuple[str, ...]
    class_labels: tuple[str, ...] = ()
    gpus_per_host: int | None = None
    local_gpus: tuple[tuple[int, ...], ...] = ()
    requeueable: bool = False
    migratable: bool = False
    synchronous: bool = True
    state: JobState = "running"
    name: str = ""

    @property
    def priority_class(self) -> str:
        """The scheduler's primary class label ("" when it has none)."""
        return self.class_labels[0] if self.class_labels else ""


#: How rackpower's notes and drain reasons start: how a later run knows a drain is ours.
DRAIN_PREFIX = "rackpower:"


class SchedulerError(Exception):
    """Anything a scheduler call can fail with; the message says what and where."""


class SchedulerUnavailable(SchedulerError):
    """The scheduler could not be reached or answered garbage: retry later, fall back now."""


class ActionRefused(SchedulerError):
    """The scheduler understood and said no (a PodDisruptionBudget 429, a job that is not
    requeueable, a finished job). Not retried blindly: the policy picks again next cycle.
    """

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class JobNotFound(ActionRefused):
    """The job is gone (finished, cancelled) by the time the action reached the scheduler."""


@runtime_checkable
class SchedulerAdapter(Protocol):
    """What every scheduler integration provides. Hosts are scheduler host names.

    Methods raise :class:`SchedulerUnavailable` when the scheduler cannot be reached and
    :class:`ActionRefused` when it refuses; they never retry internally (the link does).
    """

    #: Short name for logs, audit and alarms ("slurm", "kubernetes", "sim").
    name: str

    async def jobs(self) -> Sequence[SchedJob]:
        """Jobs that hold GPUs now (``running``; others may be included with their state)."""
        ...

    async def requeue(self, job_id: str, reason: str) -> None:
        """Stop the job and queue it again (progress since its last checkpoint is lost)."""
        ...

    async def migrate(
        self, job_id: str, away_from_hosts: Sequence[str], reason: str
    ) -> MoveOutcome:
        """Move the job off these hosts; requeue it away from them if moving is impossible."""
        ...

    async def drain(self, hosts: Sequence[str], reason: str) -> None:
        """Keep new work off these hosts; running jobs stay."""
        ...

    async def resume(self, hosts: Sequence[str]) -> None:
        """Undo :meth:`drain` for these hosts."""
        ...

    async def note(self, job_id: str, text: str) -> None:
        """Leave a human-readable note on the job (why it was capped or moved)."""
        ...

    async def drained(self) -> Mapping[str, str]:
        """Hosts rackpower keeps work off now, with the reason it gave (``rackpower: ...``).

        Read at start so that drains an earlier run left are resumed in their turn
        rather than forgotten (a restart must not strand a node without work).
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the adapter is not used afterwards."""
        ...
