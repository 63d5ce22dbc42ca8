"""Per-GPU view of the jobs: class rank, floor, cap group.

Jobs change rarely compared with the control cycle, so this is rebuilt only when the
snapshot's job tuple changes (the policy keeps the last one in its memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import PolicyConfig

from .index import IntArray, TreeIndex
from .types import FloatArray, Job


@dataclass(frozen=True, eq=False)
class JobIndex:
    """Which job and class each GPU belongs to, and how caps are grouped.

    GPUs in no job belong to the default class and are grouped by their server, so an
    action still names a sensible unit. A GPU listed by two jobs belongs to the later one.
    """

    jobs: tuple[Job, ...]
    class_names: tuple[str, ...]
    job_rank: IntArray  # per job
    gpu_job: IntArray  # per GPU: job index or -1
    gpu_rank: IntArray  # per GPU: 0 = highest priority class
    gpu_group: IntArray  # per GPU: job index, or n_jobs + server index
    floor_w: FloatArray  # per GPU: tree floor raised by the class floor_fraction
    sync_perm: IntArray  # GPUs of synchronous jobs, sorted by job
    sync_starts: IntArray  # where each synchronous job starts in sync_perm
    sync_jobs: IntArray  # job index of each run in sync_perm
    sync_gpu: npt.NDArray[np.bool_]  # per GPU: in a synchronous job

    def rank_of(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            return -1

    def group_label(self, group: int, index: TreeIndex) -> tuple[str | None, str]:
        """``(job_id, text)`` for an action: the job, or the server's unassigned GPUs."""
        n_jobs = len(self.jobs)
        if group < n_jobs:
            job = self.jobs[group]
            return job.id, f"{job.priority_class} job {job.id}"
        server = index.server_ids[group - n_jobs]
        cls = self.class_names[int(self.gpu_rank[index.server_start[group - n_jobs]])]
        return None, f"{cls} GPUs of {server} (no job)"


def build_job_index(index: TreeIndex, jobs: tuple[Job, ...], policy: PolicyConfig) -> JobIndex:
    names = tuple(c.name for c in policy.priority_classes)
    default_rank = names.index(policy.default_class)
    n = index.n_gpus
    gpu_job = np.full(n, -1, dtype=np.intp)
    job_rank = np.empty(len(jobs), dtype=np.intp)
    for j, job in enumerate(jobs):
        job_rank[j] = (
            names.index(job.priority_class) if job.priority_class in names else (default_rank)
        )
        if job.gpus:
            sel = np.asarray(job.gpus, dtype=np.intp)
            if sel.min() < 0 or sel.max() >= n:
                raise ValueError(f"job {job.id!r} names a GPU index outside 0..{n - 1}")
            gpu_job[sel] = j
    in_job = gpu_job >= 0
    gpu_rank = np.where(in_job, job_rank[np.maximum(gpu_job, 0)] if jobs else 0, default_rank)
    gpu_group = np.where(in_job, gpu_job, len(jobs) + index.gpu_server)
    fractions = np.array([c.floor_fraction for c in policy.priority_classes], dtype=np.float64)
    floor = np.minimum(
        np.maximum(index.gpu_floor_w, fractions[gpu_rank] * index.gpu_max_w), index.gpu_max_w
    )
    sync = np.array([job.synchronous for job in jobs], dtype=bool).reshape(len(jobs))
    member = np.flatnonzero(in_job & (sync[np.maximum(gpu_job, 0)] if jobs else False))
    order = np.argsort(gpu_job[member], kind="stable")
    perm = member[order]
    if perm.size:
        job_of = gpu_job[perm]
        starts = np.flatnonzero(np.concatenate(([True], job_of[1:] != job_of[:-1])))
        sync_jobs = job_of[starts]
    else:
        starts = np.empty(0, dtype=np.intp)
        sync_jobs = np.empty(0, dtype=np.intp)
    return JobIndex(
        jobs=jobs,
        class_names=names,
        job_rank=job_rank,
        gpu_job=gpu_job,
        gpu_rank=gpu_rank.astype(np.intp),
        gpu_group=gpu_group.astype(np.intp),
        floor_w=floor,
        sync_perm=perm.astype(np.intp),
        sync_starts=starts.astype(np.intp),
        sync_jobs=sync_jobs.astype(np.intp),
        sync_gpu=np.isin(np.arange(n), perm),
    )


def job_min(values: FloatArray, jobs: JobIndex) -> FloatArray:
    """Each synchronous job's GPUs set to the job's minimum (one cap per job)."""
    return _per_job(values, jobs, np.minimum)


def job_max(values: FloatArray, jobs: JobIndex) -> FloatArray:
    """Each synchronous job's GPUs set to the job's maximum (it runs at its busiest GPU's
    pace, so that GPU's demand is the job's)."""
    return _per_job(values, jobs, np.maximum)


def _per_job(values: FloatArray, jobs: JobIndex, reduce: np.ufunc) -> FloatArray:
    if jobs.sync_perm.size == 0:
        return values
    out = values.copy()
    per_job = reduce.reduceat(values[jobs.sync_perm], jobs.sync_starts)
    counts = np.diff(np.append(jobs.sync_starts, jobs.sync_perm.size))
    out[jobs.sync_perm] = np.repeat(per_job, counts)
    return out
