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
from controller.scheduler.mapping import (
    HostMap,
    JobMapping,
    fallback_jobs,
    map_class,
    map_jobs,
)

__all__ = [
    "ActionRefused",
    "HostMap",
    "JobMapping",
    "JobNotFound",
    "JobState",
    "MoveOutcome",
    "SchedJob",
    "SchedulerAdapter",
    "SchedulerError",
    "SchedulerUnavailable",
    "fallback_jobs",
    "map_class",
    "map_jobs",
]
