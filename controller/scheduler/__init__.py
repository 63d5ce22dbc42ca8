"""Job schedulers behind one small async interface, and their mapping onto the power tree."""

from controller.scheduler.base import (
    ActionRefused,
    JobNotFound,
    JobState,
    MoveOutcome,
    SchedJob,
    SchedulerAdapter,
    SchedulerError,
    SchedulerUnavailable,
)
from controller.scheduler.link import ActionResult, LinkStatus, SchedulerLink
from controller.scheduler.mapping import (
    HostMap,
    JobMapping,
    fallback_jobs,
    map_class,
    map_jobs,
)

__all__ = [
    "ActionRefused",
    "ActionResult",
    "HostMap",
    "JobMapping",
    "JobNotFound",
    "JobState",
    "LinkStatus",
    "MoveOutcome",
    "SchedJob",
    "SchedulerAdapter",
    "SchedulerError",
    "SchedulerLink",
    "SchedulerUnavailable",
    "fallback_jobs",
    "map_class",
    "map_jobs",
]
