"""GPU workloads: synchronous training jobs that react to caps, inference that replays traces.

Power is expressed as a fraction of each GPU's TDP (its maximum power limit); the
scheduler (:mod:`sim.scheduler`) maps jobs onto GPUs and multiplies. Everything is
vectorised over jobs or replicas so one step costs a few dozen NumPy operations however
many GPUs there are.

Training (reacting): an iteration alternates a compute phase (90-100 % TDP) and a
communication phase (20-75 %), with linear transitions of tens of ms. The iteration
position advances with *progress*, not wall time, so a capped job stretches its compute
phase and runs longer. Progress runs at ``ThroughputCurve.rate(x)``, ``x`` being the
job's lowest ratio of delivered power to uncapped demand over all its GPUs (a
synchronous job waits for its slowest GPU). Every 10-30 min of progress it checkpoints:
seconds near idle, after which progress up to that point is safe from a requeue.

Inference (acting): requests arrive from a :class:`~sim.trace.RequestTrace`; each is a
prefill burst at or above TDP for under a second (scaled by its prompt length), then a
decode plateau at 20-45 % TDP (rising with the replica's batch) for a time scaled by its
output length. Caps do not change the timeline, only the work counted as delivered.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from sim.trace import RequestTrace, load_azure_trace, poisson_trace

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]

IDLE_FRAC = 0.12  # a GPU with nothing to do: 10-15 % of TDP


def job_rng(seed: int, job_id: str) -> np.random.Generator:
    """A generator per job from the run seed and the job id, stable across processes.

    Python's ``hash`` of a string changes per process; CRC-32 does not, so the same seed
    gives the same job bit for bit whatever else the scenario contains.
    """
    return np.random.default_rng([seed, zlib.crc32(job_id.encode())])


@dataclass(frozen=True)
class ThroughputCurve:
    """Relative progress rate against relative power (delivered / uncapped demand).

    The default loses 0.3 % of throughput per 1 % of power cut near TDP and gets
    steeper lower down, as measured for LLM training on H100/A100 power limits.
    """

    points: tuple[tuple[float, float], ...] = (
        (0.0, 0.0),
        (0.2, 0.14),
        (0.3, 0.26),
        (0.4, 0.40),
        (0.5, 0.54),
        (0.6, 0.68),
        (0.7, 0.80),
        (0.8, 0.90),
        (0.9, 0.97),
        (1.0, 1.0),
    )

    def __post_init__(self) -> None:
        xs = [x for x, _ in self.points]
        if xs != sorted(xs) or self.points[-1] != (1.0, 1.0):
            raise ValueError("throughput points must rise in x and end at (1.0, 1.0)")

    @cached_property
    def _xp(self) -> FloatArray:
        return np.array([p for p, _ in self.points], dtype=np.float64)

    @cached_property
    def _fp(self) -> FloatArray:
        return np.array([r for _, r in self.points], dtype=np.float64)

    def rate(self, x: FloatArray) -> FloatArray:
        out: FloatArray = np.interp(x, self._xp, self._fp)
        return out


# --------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainingProfile:
    """Power shape of one training job, as fractions of TDP and seconds."""

    compute_frac: float = 0.95
    comm_frac: float = 0.45
    period_s: float = 1.5
    compute_share: float = 0.7  # share of an iteration spent in compute
    transition_s: float = 0.03
    checkpoint_every_s: float = 1200.0  # of progress
    checkpoint_s: float = 15.0
    checkpoint_frac: float = 0.15
    startup_s: float = 20.0  # loading near idle before the step up to full iterations
    startup_frac: float = 0.15
    phase_s: float = 0.0  # where in its first iteration the job starts


def sample_training_profile(rng: np.random.Generator) -> TrainingProfile:
    """A profile drawn from the published ranges (Meta/Microsoft LLM training traces)."""
    period = float(rng.uniform(0.3, 5.0))
    return TrainingProfile(
        compute_frac=float(rng.uniform(0.90, 1.00)),
        comm_frac=float(rng.uniform(0.20, 0.75)),
        period_s=period,
        compute_share=float(rng.uniform(0.55, 0.85)),
        transition_s=float(rng.uniform(0.01, 0.05)),
        checkpoint_every_s=float(rng.uniform(600.0, 1800.0)),
        checkpoint_s=float(rng.uniform(5.0, 30.0)),
        checkpoint_frac=float(rng.uniform(0.10, 0.15)),
        startup_s=float(rng.uniform(10.0, 40.0)),
        startup_frac=float(rng.uniform(0.12, 0.20)),
        phase_s=float(rng.uniform(0.0, period)),
    )


@dataclass(frozen=True)
class TrainingJobSpec:
    """A synchronous training job: ``work_s`` seconds of uncapped progress to finish."""

    job_id: str
    gpus: int
    work_s: float
    priority_class: str = "training"
    migratable: bool = True
    submit_s: float = 0.0
    profile: TrainingProfile | None = None  # None: drawn from the run seed


class TrainingFleet:
    """Every training job's progress and power phase, as arrays indexed by fleet slot."""

    _PROFILE_FIELDS = (
        "compute_frac",
        "comm_frac",
        "period_s",
        "compute_share",
        "transition_s",
        "checkpoint_every_s",
        "checkpoint_s",
        "checkpoint_frac",
        "startup_s",
        "startup_frac",
        "phase_s",
    )

    def __init__(self, curve: ThroughputCurve | None = None) -> None:
        self.curve = curve or ThroughputCurve()
        self.profiles: list[TrainingProfile] = []
        z = np.zeros(0)
        self.p: dict[str, FloatArray] = {f: z for f in self._PROFILE_FIELDS}
        self.work_s = z
        self.n_gpus = z
        self.done_s = z  # progress so far
        self.safe_s = z  # progress saved by the last completed checkpoint
        self.pending_safe_s = z  # progress a checkpoint in flight will save
        self.next_ckpt_s = z
        self.ckpt_until_s = z  # wall time the current checkpoint ends (-inf: none)
        self.iterate_from_s = z  # wall time startup ends
        self.running = np.zeros(0, dtype=bool)
        self.finished = np.zeros(0, dtype=bool)
        self.displaced = np.zeros(0, dtype=bool)  # stopped by requeue/migration/trip
        self.demanded_gpu_s = z
        self.delivered_gpu_s = z
        self.lost_gpu_s = z

    def __len__(self) -> int:
        return len(self.profiles)

    def add(self, profile: TrainingProfile, work_s: float, n_gpus: int) -> int:
        k = len(self.profiles)
        self.profiles.append(profile)
        for f in self._PROFILE_FIELDS:
            self.p[f] = np.append(self.p[f], float(getattr(profile, f)))
        self.work_s = np.append(self.work_s, work_s)
        self.n_gpus = np.append(self.n_gpus, float(n_gpus))
        self.done_s = np.append(self.done_s, 0.0)
        self.safe_s = np.append(self.safe_s, 0.0)
        self.pending_safe_s = np.append(self.pending_safe_s, 0.0)
        self.next_ckpt_s = np.append(self.next_ckpt_s, profile.checkpoint_every_s)
        self.ckpt_until_s = np.append(self.ckpt_until_s, -math.inf)
        self.iterate_from_s = np.append(self.iterate_from_s, math.inf)
        self.running = np.append(self.running, False)
        self.finished = np.append(self.finished, False)
        self.displaced = np.append(self.displaced, False)
        self.demanded_gpu_s = np.append(self.demanded_gpu_s, 0.0)
        self.delivered_gpu_s = np.append(self.delivered_gpu_s, 0.0)
        self.lost_gpu_s = np.append(self.lost_gpu_s, 0.0)
        return k

    def start(self, k: int, now_s: float) -> None:
        """(Re)start on its GPUs: load near idle for ``startup_s``, then step up."""
        self.running[k] = True
        self.iterate_from_s[k] = now_s + self.p["startup_s"][k]
        self.ckpt_until_s[k] = -math.inf

    def stop(self, k: int) -> float:
        """Stop and roll back to the last completed checkpoint; returns progress lost (s)."""
        lost = float(self.done_s[k] - self.safe_s[k])
        self.lost_gpu_s[k] += lost * self.n_gpus[k]
        self.done_s[k] = self.safe_s[k]
        self.next_ckpt_s[k] = self.safe_s[k] + self.p["checkpoint_every_s"][k]
        self.running[k] = False
        self.displaced[k] = True
        self.ckpt_until_s[k] = -math.inf
        return lost

    def fracs(self, now_s: float) -> FloatArray:
        """Uncapped demand of each job now, as a fraction of TDP (0 when not running)."""
        p = self.p
        period = p["period_s"]
        u = np.fmod(self.done_s + p["phase_s"], period)
        split = p["compute_share"] * period
        trans = p["transition_s"]
        rising = np.minimum(u / trans, 1.0)
        falling = np.maximum(1.0 - (u - split) / trans, 0.0)
        g = np.where(u < split, rising, falling)
        f = p["comm_frac"] + (p["compute_frac"] - p["comm_frac"]) * g
        f = np.where(now_s < self.iterate_from_s, p["startup_frac"], f)
        f = np.where(now_s < self.ckpt_until_s, p["checkpoint_frac"], f)
        out: FloatArray = np.where(self.running, f, 0.0)
        return out

    def _ckpt_ended(self, end_s: float) -> BoolArray:
        out: BoolArray = (
            self.running & (self.ckpt_until_s > -math.inf) & (end_s >= self.ckpt_until_s)
        )
        return out

    def iterating(self, now_s: float, dt_s: float) -> BoolArray:
        """Jobs that will make progress in the step ``[now_s, now_s + dt_s)``.

        The same rule :meth:`advance` applies, without changing anything: a scenario's
        work bound needs to know which GPUs' power turns into progress this step.
        """
        ckpt_until = np.where(self._ckpt_ended(now_s + dt_s), -math.inf, self.ckpt_until_s)
        out: BoolArray = self.running & (now_s >= self.iterate_from_s) & (now_s >= ckpt_until)
        return out

    def advance(self, x: FloatArray, now_s: float, dt_s: float) -> BoolArray:
        """Progress by ``rate(x) * dt`` where iterating; returns jobs that just finished.

        Work is counted in GPU-seconds while iterating (demanded: ``n * dt``, delivered:
        ``n * dt * rate``) and while displaced (demanded only): startup and checkpoint
        time are the job's own overheads, the same under any policy.
        """
        end = now_s + dt_s
        # A checkpoint that has ended makes its progress safe.
        ended = self._ckpt_ended(end)
        if ended.any():
            self.safe_s = np.where(ended, self.pending_safe_s, self.safe_s)
            self.ckpt_until_s = np.where(ended, -math.inf, self.ckpt_until_s)
        iterating = self.running & (now_s >= self.iterate_from_s) & (now_s >= self.ckpt_until_s)
        rate = self.curve.rate(x)
        gpu_dt = self.n_gpus * dt_s
        self.demanded_gpu_s = self.demanded_gpu_s + gpu_dt * (iterating | self.displaced)
        done_s = np.where(
            iterating, np.minimum(self.done_s + rate * dt_s, self.work_s), self.done_s
        )
        self.delivered_gpu_s = self.delivered_gpu_s + (done_s - self.done_s) * self.n_gpus
        self.done_s = done_s
        hit = iterating & (self.done_s >= self.next_ckpt_s)
        if hit.any():
            self.pending_safe_s = np.where(hit, self.done_s, self.pending_safe_s)
            self.ckpt_until_s = np.where(hit, end + self.p["checkpoint_s"], self.ckpt_until_s)
            self.next_ckpt_s = np.where(
                hit, self.done_s + self.p["checkpoint_every_s"], self.next_ckpt_s
            )
        done = iterating & (self.done_s >= self.work_s)
        if done.any():
            self.running = self.running & ~done
            self.finished = self.finished | done
        # Once iterating again after a restart, a job is no longer displaced.
        self.displaced = self.displaced & ~iterating
        return done


# --------------------------------------------------------------------------------------
# Inference


@dataclass(frozen=True)
class InferenceServiceSpec:
    """An inference service: replicas of ``gpus_per_replica`` GPUs sharing a request stream.

    ``scale`` multiplies the arrival rate (the Azure trace carries ~5.4 requests/s); the
    daily cycle multiplies it again by ``1 + daily_amplitude * cos(2 pi (h - peak_hour) /
    24)`` where ``h`` is the hour of day, starting at ``start_hour``.
    """

    job_id: str
    gpus: int
    gpus_per_replica: int = 1
    priority_class: str = "inference"
    migratable: bool = False
    submit_s: float = 0.0
    arrivals: Literal["azure", "poisson", "trace"] = "azure"
    trace_path: Path | None = None  # the trace file replayed when arrivals is "trace"
    rate_per_s: float = 5.4  # Poisson only
    scale: float = 1.0
    daily_amplitude: float = 0.0
    start_hour: float = 14.0
    peak_hour: float = 14.0
    prefill_frac: float = 1.05  # at or above TDP
    prefill_base_s: float = 0.02
    prefill_s_per_token: float = 1.5e-4
    prefill_max_s: float = 0.95  # under a second
    decode_s_per_token: float = 0.03
    decode_min_frac: float = 0.20
    decode_max_frac: float = 0.45
    batch_saturation: int = 16  # concurrent decodes at which decode power peaks
    idle_frac: float = IDLE_FRAC
    block_s: float = 3600.0  # requests are generated an hour at a time

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_replica < 1 or self.gpus % self.gpus_per_replica:
            raise ValueError(
                f"{self.job_id}: gpus ({self.gpus}) must be a multiple of gpus_per_replica"
                f" ({self.gpus_per_replica})"
            )
        if (self.arrivals == "trace") != (self.trace_path is not None):
            raise ValueError(f"{self.job_id}: a trace_path goes with arrivals 'trace' only")

    @property
    def replicas(self) -> int:
        return self.gpus // self.gpus_per_replica

    def daily_factor(self, t_s: FloatArray) -> FloatArray:
        hour = self.start_hour + t_s / 3600.0
        out: FloatArray = 1.0 + self.daily_amplitude * np.cos(
            2 * np.pi * (hour - self.peak_hour) / 24.0
        )
        return out


class InferenceLoad:
    """One service's request stream as prefill/decode counters per replica.

    Requests become three events (prefill start, prefill end = decode start, decode end)
    on a sorted timeline; each step applies the events up to ``now`` with one bincount
    per counter, so the cost does not depend on the number of requests in flight.
    """

    def __init__(
        self, spec: InferenceServiceSpec, seed: int, trace: RequestTrace | None = None
    ) -> None:
        self.spec = spec
        self.rng = job_rng(seed, spec.job_id)
        self.n = spec.replicas
        self.prefilling = np.zeros(self.n, dtype=np.intp)
        self.decoding = np.zeros(self.n, dtype=np.intp)
        sat = spec.batch_saturation
        span = spec.decode_max_frac - spec.decode_min_frac
        # Demand by state: idle, 1..sat decodes in flight, prefilling.
        self._levels: FloatArray = np.concatenate(
            (
                [spec.idle_frac],
                spec.decode_min_frac + span * np.arange(1, sat + 1) / sat,
                [spec.prefill_frac],
            )
        )
        self._fracs: FloatArray = np.full(self.n, spec.idle_frac)
        self._t = np.zeros(0)
        self._replica = np.zeros(0, dtype=np.intp)
        self._d_prefill = np.zeros(0, dtype=np.int64)
        self._d_decode = np.zeros(0, dtype=np.int64)
        self._next = 0
        self._generated_until_s = 0.0
        self._rr = int(self.rng.integers(self.n))  # round-robin cursor
        self.requests = 0
        self.demanded_gpu_s = 0.0
        self.delivered_gpu_s = 0.0
        if trace is None and spec.arrivals == "azure":
            trace = load_azure_trace()
        elif trace is None and spec.trace_path is not None:
            trace = load_azure_trace(spec.trace_path)
        self._trace = trace  # None: Poisson at spec.rate_per_s
        self._busy = np.zeros(self.n, dtype=bool)

    def _block(self, t0: float, t1: float) -> RequestTrace:
        """Arrivals in [t0, t1) before scaling: the looped trace, or Poisson."""
        spec = self.spec
        if self._trace is None:
            tr = poisson_trace(spec.rate_per_s, t1 - t0, self.rng)
            return RequestTrace(tr.arrival_s + t0, tr.context_tokens, tr.generated_tokens, t1 - t0)
        tr = self._trace
        parts_t, parts_c, parts_g = [], [], []
        k = math.floor(t0 / tr.period_s)
        while k * tr.period_s < t1:
            t = tr.arrival_s + k * tr.period_s
            sel = (t >= t0) & (t < t1)
            parts_t.append(t[sel])
            parts_c.append(tr.context_tokens[sel])
            parts_g.append(tr.generated_tokens[sel])
            k += 1
        return RequestTrace(
            np.concatenate(parts_t), np.concatenate(parts_c), np.concatenate(parts_g), t1 - t0
        )

    def _generate(self, until_s: float) -> None:
        spec = self.spec
        t0 = self._generated_until_s
        t1 = max(until_s, t0 + spec.block_s)
        base = self._block(t0, t1)
        # Scale (and the daily cycle) by thinning or replicating requests; copies arrive
        # up to a second apart so they do not all prefill in the same instant.
        s = np.maximum(spec.scale * spec.daily_factor(base.arrival_s), 0.0)
        copies = np.floor(s).astype(np.int64)
        copies += self.rng.random(len(s)) < (s - copies)
        idx = np.repeat(np.arange(len(s)), copies)
        first = np.concatenate(([0], np.cumsum(copies)[:-1])) if len(s) else np.zeros(0, int)
        nth = np.arange(len(idx)) - np.repeat(first, copies)
        arrive = base.arrival_s[idx] + np.where(nth > 0, self.rng.random(len(idx)), 0.0)
        order = np.argsort(arrive, kind="stable")
        arrive = arrive[order]
        idx = idx[order]
        ctx = base.context_tokens[idx]
        gen = base.generated_tokens[idx]
        prefill = np.minimum(
            spec.prefill_base_s + spec.prefill_s_per_token * ctx, spec.prefill_max_s
        )
        decode = spec.decode_s_per_token * gen
        n = len(arrive)
        replica = (self._rr + np.arange(n)) % self.n
        self._rr = int((self._rr + n) % self.n)
        self.requests += n
        t_new = np.concatenate((arrive, arrive + prefill, arrive + prefill + decode))
        r_new = np.concatenate((replica, replica, replica)).astype(np.intp)
        one = np.ones(n, dtype=np.int64)
        zero = np.zeros(n, dtype=np.int64)
        dp_new = np.concatenate((one, -one, zero))
        dd_new = np.concatenate((zero, one, -one))
        keep = slice(self._next, None)
        t_all = np.concatenate((self._t[keep], t_new))
        order = np.argsort(t_all, kind="stable")
        self._t = t_all[order]
        self._replica = np.concatenate((self._replica[keep], r_new))[order]
        self._d_prefill = np.concatenate((self._d_prefill[keep], dp_new))[order]
        self._d_decode = np.concatenate((self._d_decode[keep], dd_new))[order]
        self._next = 0
        self._generated_until_s = t1

    def fracs(self, now_s: float) -> FloatArray:
        """Demand of each replica at ``now_s`` as a fraction of TDP."""
        while now_s >= self._generated_until_s:
            self._generate(now_s)
        j = int(np.searchsorted(self._t, now_s, side="right"))
        if j > self._next:
            r = self._replica[self._next : j]
            self.prefilling += np.bincount(r, self._d_prefill[self._next : j], self.n).astype(
                np.intp
            )
            self.decoding += np.bincount(r, self._d_decode[self._next : j], self.n).astype(np.intp)
            self._next = j
            self._busy = (self.prefilling > 0) | (self.decoding > 0)
            # Row of the level table: decodes in flight (saturating), or prefill above all.
            code = np.minimum(self.decoding, self.spec.batch_saturation)
            code[self.prefilling > 0] = self.spec.batch_saturation + 1
            self._fracs = self._levels[code]
        return self._fracs

    @property
    def busy(self) -> BoolArray:
        """Replicas with a request in flight at the last :meth:`fracs` call."""
        return self._busy

    def account(self, rate: FloatArray, placed: bool, dt_s: float) -> None:
        """Busy replicas demand their GPUs; they deliver ``rate`` of it when placed."""
        gpu_dt = self.spec.gpus_per_replica * dt_s
        busy = self._busy
        self.demanded_gpu_s += gpu_dt * float(np.count_nonzero(busy))
        if placed:
            self.delivered_gpu_s += gpu_dt * float(rate[busy].sum())
