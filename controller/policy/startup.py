"""Start-up reservations: budget a new synchronous job at its maximum before it ramps.

A training job appears in the scheduler's job list while it loads (near idle for tens
of seconds), then every one of its GPUs steps up to its compute phase in the same
tens of milliseconds. A policy that plans on what it has seen gives the idle job's
share to its neighbours, and the step lands on a node whose budget is already spent:
the node runs over its envelope until the caps bite (one cycle plus the actuation
delay, 28-35 % over for 2-4 s in the scenarios). The job's appearance is the warning,
so its GPUs are planned at their maximum from the cycle it is first seen until it has
visibly ramped (a GPU of it drew half its maximum, or sat at its cap) or
``STARTUP_RESERVE_S`` has passed, whichever comes first. Planning it at its maximum
caps it at its budget before it rises, and takes that budget from the others while
they can still be lowered in time.

An inference replica ramps request by request: nothing it draws says it has ramped,
so a new one is planned at its maximum for its first ``ASYNC_WARMUP_S``, long enough
for its demand window to have seen its bursts. Planned below them, each first burst
would have to wait for power to be taken from a lower class and confirmed (the
cap-sum rule): seconds of a higher class held below a lower one.

A GPU in no job gives no warning at all: without a scheduler (or on a GPU the scheduler
says is free, or one a tenant with root runs work on outside it) the step from idle to
maximum is the first sign. ``rackpower demo``, which has no job list, once released a
whole rack's caps while it idled and a job then took it from 12.1 to 29.2 kW on a
23.4 kW envelope. Under the cap-sum rule (capsum.py) that cannot happen: an idle GPU's
cap counts in full in its rack's sum, so its step is held by its cap until power is
taken from elsewhere and confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .jobs import JobIndex
from .types import FloatArray, Job

BoolArray = npt.NDArray[np.bool_]

STARTUP_RESERVE_S = 60.0  # longer than a typical load phase (10-40 s); then believe the draw
RAMP_FRACTION = 0.5  # above idle, checkpoint and most communication phases
ASYNC_WARMUP_S = 60.0  # an asynchronous job's first minute: enough bursts to plan on


@dataclass(frozen=True, eq=False)
class StartupMemory:
    """Per GPU: which job placement it carries, since when, and whether that job ramped."""

    jobs: tuple[Job, ...]
    keys: tuple[tuple[str, tuple[int, ...]] | None, ...]
    since_s: FloatArray
    ramped: BoolArray


def _keys(jobs: JobIndex, n_gpus: int) -> tuple[tuple[str, tuple[int, ...]] | None, ...]:
    """A job placement per GPU: a job restarted elsewhere (requeue, migration) is new."""
    keys: list[tuple[str, tuple[int, ...]] | None] = [None] * n_gpus
    for j in np.unique(jobs.gpu_job[jobs.gpu_job >= 0]).tolist():
        job = jobs.jobs[j]
        key = (job.id, job.gpus)
        for g in np.flatnonzero(jobs.gpu_job == j).tolist():
            keys[g] = key
    return tuple(keys)


def startup_pending(
    memory: StartupMemory | None,
    jobs: JobIndex,
    now_s: float,
    wanted_w: FloatArray,
    max_w: FloatArray,
) -> tuple[BoolArray, StartupMemory]:
    """Per GPU: still reserved at its maximum; and the memory for the next cycle.

    ``wanted_w`` is what each GPU is believed to want this cycle (its draw, or its
    maximum when held at its cap or unseen).
    """
    n = max_w.size
    if memory is None or memory.since_s.shape != (n,):
        keys = _keys(jobs, n)
        since = np.full(n, now_s)
        ramped = np.zeros(n, dtype=bool)
    elif memory.jobs is not jobs.jobs and memory.jobs != jobs.jobs:
        keys = _keys(jobs, n)
        changed = np.fromiter(
            (a != b for a, b in zip(keys, memory.keys, strict=True)), dtype=bool, count=n
        )
        since = np.where(changed, now_s, memory.since_s)
        ramped = memory.ramped & ~changed
    else:
        keys, since, ramped = memory.keys, memory.since_s, memory.ramped
    if jobs.sync_perm.size:
        up = (wanted_w >= RAMP_FRACTION * max_w).astype(np.float64)
        job_up = np.maximum.reduceat(up[jobs.sync_perm], jobs.sync_starts) > 0
        counts = np.diff(np.append(jobs.sync_starts, jobs.sync_perm.size))
        seen_up = np.zeros(n, dtype=bool)
        seen_up[jobs.sync_perm] = np.repeat(job_up, counts)
        ramped = ramped | seen_up
    pending: BoolArray = jobs.sync_gpu & ~ramped & (now_s - since < STARTUP_RESERVE_S)
    # An inference replica ramps request by request, so no draw says it has ramped;
    # until its demand window has seen a while of its bursts it is planned at maximum.
    asynchronous = (jobs.gpu_job >= 0) & ~jobs.sync_gpu
    pending |= asynchronous & (now_s - since < ASYNC_WARMUP_S)
    return pending, StartupMemory(jobs=jobs.jobs, keys=keys, since_s=since, ramped=ramped)
