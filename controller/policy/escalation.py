"""Trip allowance and the last resort: moving a job off a node caps cannot save.

Breakers trip on heat, so an overload is a budget (I^2 t against the trip curve), not an
instant failure. When even every GPU at its floor leaves a node over its envelope, caps
have nothing left to give; the policy then asks the scheduler to move or requeue ONE
job, the lowest-priority migratable one, and waits to see the effect before asking again.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from controller.model.config import Escalation, TripCurve

from .index import TreeIndex
from .jobs import JobIndex
from .types import FloatArray, Migrate, Requeue

COOLING_S = 300.0  # a breaker's thermal memory: spent allowance decays with this constant


def allowed_s(curve: TripCurve, ratio: float) -> float:
    """Seconds an overload of ``ratio`` (load / rating) may last; inf below the curve.

    Interpolated log-log between points (breaker curves are straight there), beyond
    the last point along the last segment, zero at or above the instantaneous ratio.
    """
    if ratio >= curve.instant_ratio:
        return 0.0
    points = curve.points
    if ratio < points[0][0]:
        return math.inf
    if len(points) == 1:
        return points[0][1]
    # The segment containing ratio, or the last one (extrapolated) beyond the last point.
    (r0, t0), (r1, t1) = points[-2], points[-1]
    for (a, ta), (b, tb) in itertools.pairwise(points):
        if ratio <= b:
            (r0, t0), (r1, t1) = (a, ta), (b, tb)
            break
    slope = (math.log(t1) - math.log(t0)) / (math.log(r1) - math.log(r0))
    return math.exp(math.log(t0) + slope * (math.log(ratio) - math.log(r0)))


def integrate_trip(
    used: FloatArray,
    load_w: FloatArray,
    rating_w: FloatArray,
    curves: list[TripCurve | None],
    dt_s: float,
) -> FloatArray:
    """The policy's own estimate of spent allowance (0..1) when meters do not report one."""
    out = used * math.exp(-dt_s / COOLING_S) if dt_s > 0 else used.copy()
    ratio = load_w / rating_w
    for k in np.flatnonzero(ratio > 1.0):
        curve = curves[k]
        if curve is None:
            continue
        limit = allowed_s(curve, float(ratio[k]))
        out[k] = 1.0 if limit <= 0 else min(1.0, used[k] + dt_s / limit)
    return out


@dataclass(frozen=True)
class EscalationInputs:
    """What the check needs for one cycle (per constraint node arrays)."""

    now_s: float
    floor_load_w: FloatArray  # load with every GPU under the node at its floor
    envelope_w: FloatArray
    rating_w: FloatArray
    trip_used: FloatArray
    load_w: FloatArray
    headroom_w: FloatArray
    trusted: npt.NDArray[np.bool_]  # the node's own meter is fresh
    gpu_power_w: FloatArray


def escalate(
    index: TreeIndex,
    jobs: JobIndex,
    inp: EscalationInputs,
    curves: list[TripCurve | None],
    cfg: Escalation,
    infeasible_since_s: FloatArray,
    last_escalation_s: FloatArray,
    pending: dict[str, float],
) -> tuple[list[Migrate | Requeue], FloatArray, FloatArray, dict[str, float]]:
    """Escalation actions and the updated timers.

    A node escalates when caps at floor cannot bring it inside its envelope (confirmed on
    a fresh meter) and either the breaker would trip at that load, half (configurable) of
    its allowance is already spent, or the envelope has been violated for a whole
    ``min_interval_s``; at most once per node per ``min_interval_s``.
    """
    infeasible = (inp.floor_load_w > inp.envelope_w) & inp.trusted
    since = np.where(infeasible, np.minimum(infeasible_since_s, inp.now_s), np.inf)
    last = last_escalation_s
    pending = {j: t for j, t in pending.items() if inp.now_s - t < cfg.min_interval_s}
    actions: list[Migrate | Requeue] = []
    if not cfg.enabled or not infeasible.any() or not jobs.jobs:
        return actions, since, last, pending
    last = last.copy()
    for k in np.flatnonzero(infeasible):
        if inp.now_s - last[k] < cfg.min_interval_s:
            continue
        ratio = inp.floor_load_w[k] / inp.rating_w[k]
        curve = curves[k]
        will_trip = curve is not None and allowed_s(curve, float(ratio)) < math.inf
        urgent = (
            curve is None
            or will_trip
            or inp.trip_used[k] >= cfg.trip_allowance_fraction
            or inp.now_s - since[k] >= cfg.min_interval_s
        )
        if not urgent:
            continue
        action = _pick(index, jobs, inp, int(k), pending, will_trip, ratio)
        if action is None:
            continue
        actions.append(action)
        last[k] = inp.now_s
        pending[action.job_id] = inp.now_s
    return actions, since, last, pending


def _pick(
    index: TreeIndex,
    jobs: JobIndex,
    inp: EscalationInputs,
    k: int,
    pending: dict[str, float],
    will_trip: bool,
    ratio: float,
) -> Migrate | Requeue | None:
    """The lowest-priority migratable job under node k (largest draw first among equals)."""
    start, stop = int(index.start[k]), int(index.stop[k])
    under = jobs.gpu_job[start:stop]
    best: tuple[int, float, str] | None = None
    best_j = -1
    for j in np.unique(under[under >= 0]):
        job = jobs.jobs[int(j)]
        if not job.migratable or job.id in pending:
            continue
        draw = float(inp.gpu_power_w[start:stop][under == j].sum())
        key = (int(jobs.job_rank[j]), draw, job.id)
        if best is None or (key[0], key[1]) > (best[0], best[1]):
            best, best_j = key, int(j)
    if best is None:
        return None
    job = jobs.jobs[best_j]
    nid = index.node_ids[k]
    why = (
        f"{nid}: {inp.floor_load_w[k] / 1e3:.1f} kW even with every GPU at its floor,"
        f" envelope {inp.envelope_w[k] / 1e3:.1f} kW"
        f" (load {inp.load_w[k] / 1e3:.1f} kW, {ratio:.2f}x rating,"
        f" trip allowance used {100 * inp.trip_used[k]:.0f} %"
        f"{', breaker would trip' if will_trip else ''});"
        f" moving the lowest-priority migratable job {job.id} ({job.priority_class},"
        f" {best[1] / 1e3:.1f} kW under {nid})"
    )
    # Somewhere to go: another rack outside this node with room for the job's draw.
    for r in index.racks:
        inside = index.start[r] >= start and index.stop[r] <= stop
        if not inside and inp.headroom_w[r] >= best[1]:
            return Migrate(job.id, nid, why + f"; {index.node_ids[r]} has room")
    return Requeue(job.id, nid, why + "; no rack has room, requeue")
