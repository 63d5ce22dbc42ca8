"""Job schedulers behind one small async interface, and their mapping onto the power tree."""

from controller.integrations.scheduler.base import (
    ActionRefused,
    JobNotFound,
    JobState,
    MoveOutcome,
    SchedJob,
    SchedulerAdapter,
    SchedulerError,
    SchedulerUnavailable,
)
from controller.integrations.scheduler.mapping import (
    HostMap,
    JobMapping,
    fallback_jobs,
    map_class,
    map_jobs,
)
from controller.integrations.scheduler.runner import ActionResult, LinkStatus, SchedulerLink

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
