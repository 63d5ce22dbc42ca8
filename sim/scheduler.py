"""A simulated cluster scheduler: places jobs on GPUs and hosts their workloads.

It is the policy's counterpart to Slurm or Kubernetes in scenarios: it owns which GPUs
each job holds, obeys ``requeue``/``migrate``/``drain``/``resume`` the way a real
scheduler would (after a delay, losing the progress since the last checkpoint), and
turns the jobs' workloads into a per-GPU demand vector for :class:`sim.plant.Plant`.

One scenario step::

    demand_w = sched.demand_w(t)                      # arrivals, restarts, then demand
    state = plant.step(state, Setpoints(demand_w, limits, lost), dt)
    sched.advance(t, dt, state.gpu_power_w, state.dark_gpu)   # progress, trips, finishes

A job that loses power (a trip upstream) fails and is requeued like a crashed job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree
from controller.policy.types import Job
from sim.workloads import (
    IDLE_FRAC,
    InferenceLoad,
    InferenceServiceSpec,
    ThroughputCurve,
    TrainingFleet,
    TrainingJobSpec,
    job_rng,
    sample_training_profile,
)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

JobSpec = TrainingJobSpec | InferenceServiceSpec

#: What the policy sees of a placed job: the policy's own ``Job`` type (id, priority_class,
#: gpus, synchronous, migratable), so the scenario runner passes ``jobs()`` straight on.
JobView = Job


@dataclass(frozen=True)
class SchedulerConfig:
    requeue_delay_s: float = 60.0  # back in the queue, then restarted wherever GPUs are free
    migrate_delay_s: float = 30.0  # drained, then restarted away from the named nodes
    idle_frac: float = IDLE_FRAC  # draw of a GPU without work, fraction of TDP
    gpu_spread: float = 0.03  # GPUs of one model differ by up to this much in draw
    priority_classes: tuple[str, ...] = ("critical", "training", "inference", "batch")
    throughput: ThroughputCurve = field(default_factory=ThroughputCurve)


@dataclass(frozen=True)
class SchedulerEvent:
    t_s: float
    job_id: str
    kind: Literal["started", "finished", "requeued", "migrated", "failed"]
    gpus: tuple[int, ...] = ()  # the GPUs it started on or left
    lost_gpu_s: float = 0.0  # progress thrown away (GPU-seconds)


@dataclass(frozen=True)
class ClassWork:
    """GPU-seconds of progress for one priority class (or all)."""

    demanded_gpu_s: float
    delivered_gpu_s: float  # gross: what ran, before losses to requeues
    lost_gpu_s: float  # progress since the last checkpoint thrown away by requeues

    @property
    def net_gpu_s(self) -> float:
        return self.delivered_gpu_s - self.lost_gpu_s


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    priority_class: str
    state: Literal["queued", "running", "finished"]
    gpus: tuple[int, ...]
    progress_s: float  # training: seconds of uncapped progress done; inference: 0
    work_s: float  # training: total to do; inference: 0
    work: ClassWork


@dataclass
class _Job:
    spec: JobSpec
    order: int  # submission order, for FIFO within a class
    slot: int  # fleet index (training) or index into _loads (inference)
    state: Literal["queued", "running", "finished"] = "queued"
    gpus: tuple[int, ...] = ()
    not_before_s: float = 0.0
    avoid: frozenset[str] = frozenset()

    @property
    def training(self) -> bool:
        return isinstance(self.spec, TrainingJobSpec)


class SimScheduler:
    """Jobs, their placement on GPUs, and the per-GPU demand they produce."""

    def __init__(
        self,
        tree: PowerTree,
        specs: Iterable[JobSpec] = (),
        *,
        seed: int = 0,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.tree = tree
        self.seed = seed
        self.config = config or SchedulerConfig()
        self.n_gpus = len(tree.gpus)
        self.max_w: FloatArray = np.array([g.max_w for g in tree.gpus], dtype=np.float64)
        spread = job_rng(seed, "gpu-spread").uniform(1.0 - self.config.gpu_spread, 1.0, self.n_gpus)
        # What each GPU draws at 100 % of a workload's TDP fraction (model spread included).
        self.gpu_tdp_w: FloatArray = self.max_w * spread
        self.demand_scale = 1.0
        self.fleet = TrainingFleet(self.config.throughput)
        self._loads: list[InferenceLoad] = []
        self._jobs: dict[str, _Job] = {}
        self._rank = {c: i for i, c in enumerate(self.config.priority_classes)}
        self._busy = np.zeros(self.n_gpus, dtype=bool)
        self._drained: dict[str, tuple[int, int]] = {}
        self._drained_mask = np.zeros(self.n_gpus, dtype=bool)
        self._dark = np.zeros(self.n_gpus, dtype=bool)
        self._next_due_s = np.inf
        self._views: tuple[JobView, ...] = ()
        self._last_demand_w: FloatArray = self.config.idle_frac * self.gpu_tdp_w
        self.events: list[SchedulerEvent] = []
        self._rebuild()
        for spec in specs:
            self.submit(spec)

    # -- jobs -------------------------------------------------------------------------

    def submit(self, spec: JobSpec, now_s: float | None = None) -> None:
        """Queue a job; it starts at ``spec.submit_s`` (or ``now_s``) once GPUs are free."""
        if spec.job_id in self._jobs:
            raise ValueError(f"duplicate job id {spec.job_id!r}")
        if spec.gpus < 1 or spec.gpus > self.n_gpus:
            raise ValueError(f"{spec.job_id}: needs {spec.gpus} GPUs, site has {self.n_gpus}")
        if isinstance(spec, TrainingJobSpec):
            profile = spec.profile or sample_training_profile(job_rng(self.seed, spec.job_id))
            slot = self.fleet.add(profile, spec.work_s, spec.gpus)
        else:
            slot = len(self._loads)
            self._loads.append(InferenceLoad(spec, self.seed))
        due = spec.submit_s if now_s is None else max(now_s, spec.submit_s)
        self._jobs[spec.job_id] = _Job(spec, len(self._jobs), slot, not_before_s=due)
        self._next_due_s = min(self._next_due_s, due)
        self._rebuild()

    def jobs(self) -> tuple[JobView, ...]:
        """Placed jobs as ``controller.policy.Job`` values, ready for a snapshot.

        The tuple is rebuilt only when placement changes, so asking every cycle is free.
        """
        return self._views

    def requeue(self, job_id: str, now_s: float) -> bool:
        """Stop a migratable job and put it back in the queue (restart after the delay).

        Progress since its last completed checkpoint is lost. False if the job is not
        running or not migratable (the flag is the owner's consent to being moved).
        """
        return self._displace(job_id, now_s, self.config.requeue_delay_s, frozenset(), "requeued")

    def migrate(self, job_id: str, away_from_node_ids: Sequence[str], now_s: float) -> bool:
        """Like :meth:`requeue`, but the job restarts only on GPUs outside the given nodes."""
        for nid in away_from_node_ids:
            self.tree.node(nid)  # KeyError names an unknown node
        return self._displace(
            job_id, now_s, self.config.migrate_delay_s, frozenset(away_from_node_ids), "migrated"
        )

    def drain(self, node_id: str) -> None:
        """Keep new work off every GPU under ``node_id``; running jobs stay."""
        self._drained[node_id] = self.tree.gpu_range(node_id)
        self._drained_mask[slice(*self._drained[node_id])] = True

    def resume(self, node_id: str) -> None:
        """Undo :meth:`drain` for ``node_id`` (other drains stay in force)."""
        self._drained.pop(node_id, None)
        self._drained_mask[:] = False
        for a, b in self._drained.values():
            self._drained_mask[a:b] = True
        self._next_due_s = -np.inf  # queued jobs may fit now

    @property
    def drained(self) -> frozenset[str]:
        return frozenset(self._drained)

    def _displace(
        self,
        job_id: str,
        now_s: float,
        delay_s: float,
        avoid: frozenset[str],
        kind: Literal["requeued", "migrated", "failed"],
        force: bool = False,
    ) -> bool:
        job = self._jobs[job_id]
        if job.state != "running" or not (job.spec.migratable or force):
            return False
        lost_gpu_s = 0.0
        if job.training:
            lost_gpu_s = self.fleet.stop(job.slot) * job.spec.gpus
        self.events.append(SchedulerEvent(now_s, job_id, kind, job.gpus, lost_gpu_s))
        self._busy[list(job.gpus)] = False
        job.state = "queued"
        job.gpus = ()
        job.not_before_s = now_s + delay_s
        job.avoid = avoid
        self._next_due_s = min(self._next_due_s, job.not_before_s)
        self._rebuild()
        return True

    # -- placement ------------------------------------------------------------------------

    def _place_due(self, now_s: float) -> None:
        now_s += 1e-9  # times are sums of steps: forgive their rounding
        if now_s < self._next_due_s:
            return
        queued = sorted(
            (j for j in self._jobs.values() if j.state == "queued"),
            key=lambda j: (self._rank.get(j.spec.priority_class, len(self._rank)), j.order),
        )
        changed = False
        next_due = np.inf
        for job in queued:
            if job.not_before_s > now_s:
                next_due = min(next_due, job.not_before_s)
                continue
            free = ~self._busy & ~self._drained_mask & ~self._dark
            for nid in job.avoid:
                a, b = self.tree.gpu_range(nid)
                free[a:b] = False
            idx = np.flatnonzero(free)
            if len(idx) < job.spec.gpus:
                continue  # waits; retried whenever something frees up
            gpus = idx[: job.spec.gpus]  # first fit: whole servers and racks where possible
            self._busy[gpus] = True
            job.gpus = tuple(int(g) for g in gpus)
            job.state = "running"
            job.avoid = frozenset()
            if job.training:
                self.fleet.start(job.slot, now_s)
            self.events.append(SchedulerEvent(now_s, job.spec.job_id, "started", job.gpus))
            changed = True
        self._next_due_s = next_due
        if changed:
            self._rebuild()

    def _rebuild(self) -> None:
        """Slot map: GPU -> training job / inference replica / idle, and the policy's view."""
        n_train = len(self.fleet)
        self._inf_base: list[int] = []
        base = n_train
        for load in self._loads:
            self._inf_base.append(base)
            base += load.n
        self._idle_slot = base
        gpu_slot = np.full(self.n_gpus, self._idle_slot, dtype=np.intp)
        views = []
        for job in sorted(self._jobs.values(), key=lambda j: j.order):
            if job.state != "running":
                continue
            g = np.array(job.gpus, dtype=np.intp)
            if job.training:
                gpu_slot[g] = job.slot
            else:
                per = job.spec.gpus_per_replica  # type: ignore[union-attr]
                gpu_slot[g] = self._inf_base[job.slot] + np.arange(len(g)) // per
            views.append(
                JobView(
                    id=job.spec.job_id,
                    priority_class=job.spec.priority_class,
                    gpus=job.gpus,
                    synchronous=job.training,
                    migratable=job.spec.migratable,
                )
            )
        self._views = tuple(views)
        self._gpu_slot = gpu_slot
        groups = np.where(gpu_slot < self._idle_slot, gpu_slot, -1)
        groups.setflags(write=False)
        self._groups = groups
        placed = gpu_slot < self._idle_slot
        self._perm = np.flatnonzero(placed)[np.argsort(gpu_slot[placed], kind="stable")]
        sorted_slots = gpu_slot[self._perm]
        if len(sorted_slots):
            starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        else:
            starts = np.zeros(0, dtype=np.intp)
        self._starts = starts.astype(np.intp)
        self._present = sorted_slots[self._starts]
        self._n_slots = self._idle_slot + 1

    # -- the step -----------------------------------------------------------------------

    def demand_w(self, now_s: float) -> FloatArray:
        """Uncapped demand of every GPU for the step starting at ``now_s`` (idle if free)."""
        self._place_due(now_s)
        parts = [self.fleet.fracs(now_s)]
        parts.extend(load.fracs(now_s) for load in self._loads)
        parts.append(np.array([self.config.idle_frac]))
        frac = np.concatenate(parts)
        demand: FloatArray = frac[self._gpu_slot] * self.gpu_tdp_w
        if self.demand_scale != 1.0:
            demand = demand * self.demand_scale
        self._last_demand_w = demand
        return demand

    def advance(
        self, now_s: float, dt_s: float, gpu_power_w: FloatArray, dark_gpu: BoolArray | None = None
    ) -> None:
        """Account the step that started at ``now_s`` given what the GPUs actually drew.

        A job's pace is set by its worst GPU: ``x = power / min(demand, max_w)`` (what the
        GPU drew over what it would have drawn at its default limit), minimum over its GPUs.
        """
        if dark_gpu is not None and dark_gpu is not self._dark:
            if not np.array_equal(dark_gpu, self._dark):
                self._next_due_s = -np.inf  # power back: queued jobs may fit now
            self._dark = dark_gpu
            if (dark_gpu & self._busy).any():
                self._fail_dark(now_s)
        uncapped = np.minimum(self._last_demand_w, self.max_w)
        x_gpu = np.minimum(gpu_power_w / np.maximum(uncapped, 1e-9), 1.0)
        x = np.ones(self._n_slots)
        if len(self._starts):
            x[self._present] = np.minimum.reduceat(x_gpu[self._perm], self._starts)
        n_train = len(self.fleet)
        if n_train:
            done = self.fleet.advance(x[:n_train], now_s, dt_s)
            if done.any():
                self._finish(np.flatnonzero(done), now_s + dt_s)
        curve = self.config.throughput
        for k, load in enumerate(self._loads):
            a = self._inf_base[k]
            rate = curve.rate(x[a : a + load.n])
            placed = self._job_of_load(k).state == "running"
            load.account(rate, placed, dt_s)

    def work_weights(self, now_s: float, dt_s: float) -> FloatArray:
        """Per GPU: 1 where its power turns into counted work this step, else 0.

        Call after :meth:`demand_w` for the same step. Training GPUs count while their job
        iterates (not in startup or checkpoints), inference GPUs while their replica has a
        request in flight: exactly the GPU-seconds :meth:`advance` will count as demanded
        and deliver in proportion to the throughput curve. A scenario's work bound
        (the oracle) weighs GPUs with this.
        """
        w = np.zeros(self._n_slots)
        n_train = len(self.fleet)
        if n_train:
            w[:n_train] = self.fleet.iterating(now_s, dt_s)
        for k, load in enumerate(self._loads):
            if self._job_of_load(k).state == "running":
                a = self._inf_base[k]
                w[a : a + load.n] = load.busy
        out: FloatArray = w[self._gpu_slot]
        return out

    def work_groups(self) -> IntArray:
        """Per GPU: its pace group (a training job, or an inference replica); -1 if idle.

        GPUs of one group progress at the pace of the slowest of them, as :meth:`advance`
        counts it, so a bound on the work must treat a group as one unit. The same
        (read-only) array until placement changes, so a caller can tell by identity.
        """
        return self._groups

    def _job_of_load(self, k: int) -> _Job:
        spec_id = self._loads[k].spec.job_id
        return self._jobs[spec_id]

    def _fail_dark(self, now_s: float) -> None:
        for job in list(self._jobs.values()):
            if job.state == "running" and self._dark[list(job.gpus)].any():
                self._displace(
                    job.spec.job_id,
                    now_s,
                    self.config.requeue_delay_s,
                    frozenset(),
                    "failed",
                    force=True,
                )

    def _finish(self, slots: IntArray, t_s: float) -> None:
        finished = set(slots.tolist())
        for job in self._jobs.values():
            if job.training and job.state == "running" and job.slot in finished:
                self._busy[list(job.gpus)] = False
                self.events.append(SchedulerEvent(t_s, job.spec.job_id, "finished", job.gpus))
                job.state = "finished"
                job.gpus = ()
        self._next_due_s = -np.inf  # freed GPUs: queued jobs may start
        self._rebuild()

    # -- readouts ---------------------------------------------------------------------------

    def _job_work(self, job: _Job) -> ClassWork:
        if job.training:
            f, k = self.fleet, job.slot
            return ClassWork(
                float(f.demanded_gpu_s[k]), float(f.delivered_gpu_s[k]), float(f.lost_gpu_s[k])
            )
        load = self._loads[job.slot]
        return ClassWork(load.demanded_gpu_s, load.delivered_gpu_s, 0.0)

    def progress(self) -> dict[str, JobProgress]:
        out: dict[str, JobProgress] = {}
        for jid, job in self._jobs.items():
            done = float(self.fleet.done_s[job.slot]) if job.training else 0.0
            work = job.spec.work_s if isinstance(job.spec, TrainingJobSpec) else 0.0
            out[jid] = JobProgress(
                jid, job.spec.priority_class, job.state, job.gpus, done, work, self._job_work(job)
            )
        return out

    def work(self) -> dict[str, ClassWork]:
        """GPU-seconds per priority class, plus ``"total"``."""
        sums: dict[str, list[float]] = {}
        for job in self._jobs.values():
            w = self._job_work(job)
            for key in (job.spec.priority_class, "total"):
                acc = sums.setdefault(key, [0.0, 0.0, 0.0])
                acc[0] += w.demanded_gpu_s
                acc[1] += w.delivered_gpu_s
                acc[2] += w.lost_gpu_s
        sums.setdefault("total", [0.0, 0.0, 0.0])
        return {k: ClassWork(*v) for k, v in sums.items()}

    def gpu_jobs(self) -> Mapping[int, str]:
        """Job id of every busy GPU."""
        return {g: v.id for v in self._views for g in v.gpus}

    @property
    def migrations(self) -> int:
        return sum(1 for e in self.events if e.kind in ("requeued", "migrated"))
