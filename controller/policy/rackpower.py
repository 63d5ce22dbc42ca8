"""The rackpower policy: job-aware, priority-ordered capping over every level of the tree.

One cycle:

1. GPU demand: what each GPU would draw uncapped, held at its peak (a synchronous job
   over its slowest iterations, an inference replica over its recent bursts). A GPU
   drawing at its cap, or one we cannot see, is assumed to want its maximum; so is a
   new job that has not ramped yet (startup.py).
2. Node loads (max of measured and children), loss ratios, the margin for load no cap
   reaches, the effective envelope (lost feeds, demand response).
3. Per node the cap-sum budget: what the GPU caps under it may add up to (capsum.py).
4. Water-filling by class in two tiers (demand plus headroom, then spare) turns the
   budgets into caps (budget.py); a synchronous job gets one cap, fit for its busiest GPU.
5. Lowers go out at once, raises only out of room that confirmed lowers left
   (capsum.py); escalation when floors are not enough.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from controller.model.config import TripCurve
from controller.model.topology import PowerTree

from .actions import cap_actions
from .budget import Allocation, GpuTerms, allocate, class_spacing
from .capsum import (
    ExposureMemory,
    after_commands,
    exposure_now,
    fit_lowers,
    gate_raises,
)
from .escalation import EscalationInputs, escalate, integrate_trip
from .index import IntArray, TreeIndex, covered, tree_index
from .jobs import JobIndex, build_job_index, job_max, job_min
from .loads import (
    BoolArray,
    Loads,
    effective_envelopes,
    estimate_loads,
    gpu_power_worst_case,
    nameplate_efficiency,
    reservations,
)
from .margin import MarginMemory, update_margin
from .startup import StartupMemory, startup_pending
from .types import Action, FloatArray, NodeStatus, PolicyState, Snapshot, frozen_array
from .window import WindowMax

DEMAND_HOLD_S = 10.0  # longer than the slowest training iteration (5 s)
DEMAND_BUCKETS = 5
ASYNC_HOLD_S = 60.0  # asynchronous GPUs (inference replicas, no job): their recent bursts
ASYNC_BUCKETS = 6
UNATTRIBUTED_HOLD_S = 10.0  # unexplained power is believed only once it persists this long
BOUND_FRACTION = 0.03  # a GPU within 3 % (+2 W) of its enforced limit is held by it
BOUND_W = 2.0
LOSS_SMOOTHING = 0.2  # EMA weight of this cycle's measured/attributed ratio
LOSS_RATIO_MAX = 1.5
NEAR_ENVELOPE_FRACTION = 0.8  # a loss ratio measured above this load speaks for full load
NAMEPLATE_TOLERANCE = 0.01  # meters and GPU telemetry disagree by this much in noise alone
MAX_DT_S = 60.0
HEADROOM_FRACTION = 0.05  # of a GPU's max, above its demand, before slack moves elsewhere
DEADBAND_FRACTION = 0.02  # of a GPU's max: smaller moves are not worth an actuation
SETTLE_S = 10.0  # an allocation above a cap this long is closed even below the deadband
SETTLE_FRACTION = 0.005  # ... if at least this much of the GPU's max
SETTLE_BUCKETS = 5


@dataclass(frozen=True, eq=False)
class Memory:
    """What rackpower remembers between cycles (private to this module)."""

    demand: WindowMax
    demand_async: WindowMax
    margin: MarginMemory
    loss_ratio: FloatArray
    trip_used: FloatArray
    infeasible_since_s: FloatArray
    last_escalation_s: FloatArray
    unattributed_w: FloatArray
    unattributed_low: WindowMax  # of minus the raw unexplained power: a sliding minimum
    pending: Mapping[str, float] = field(default_factory=dict)
    jobs: JobIndex | None = None
    startup: StartupMemory | None = None
    exposure: ExposureMemory | None = None
    gap: WindowMax | None = None  # of cap minus allocation: a sliding minimum of the gap
    started_s: float = 0.0


def _fresh_memory(index: TreeIndex, tree: PowerTree, now_s: float) -> Memory:
    n = index.n_nodes
    return Memory(
        exposure=ExposureMemory.unknown(index.gpu_max_w),
        started_s=now_s,
        demand=WindowMax.empty(index.n_gpus, DEMAND_HOLD_S, DEMAND_BUCKETS),
        demand_async=WindowMax.empty(index.n_gpus, ASYNC_HOLD_S, ASYNC_BUCKETS),
        margin=MarginMemory.empty(n, tree.site.policy.margin),
        loss_ratio=np.full(n, np.nan),
        trip_used=np.zeros(n),
        infeasible_since_s=np.full(n, np.inf),
        last_escalation_s=np.full(n, -np.inf),
        unattributed_w=np.zeros(n),
        unattributed_low=WindowMax.empty(n, UNATTRIBUTED_HOLD_S, DEMAND_BUCKETS),
    )


def decide(
    snapshot: Snapshot, tree: PowerTree, state: PolicyState | None
) -> tuple[tuple[Action, ...], PolicyState]:
    """One control cycle. Pure: the same inputs give the same outputs, nothing is mutated."""
    index = tree_index(tree)
    cfg = tree.site.policy
    now = snapshot.now_s
    fresh = (
        state is None
        or state.tree_id != id(tree)
        or not isinstance(state.memory, Memory)
        or state.target_w.shape != (index.n_gpus,)
    )
    if fresh:
        memory = _fresh_memory(index, tree, now)
        reference = np.asarray(snapshot.gpu_limit_w, dtype=np.float64)
        dt = 0.0
    else:
        assert state is not None
        memory = state.memory
        reference = state.target_w
        dt = min(max(now - state.now_s, 0.0), MAX_DT_S)

    jobs = memory.jobs
    if jobs is None or jobs.jobs != snapshot.jobs:
        jobs = build_job_index(index, snapshot.jobs, cfg)
    floor, max_w = jobs.floor_w, index.gpu_max_w
    # A server that ignores its caps (conformance.py) draws what it likes: plan it at its
    # maximum and give it no cap to shed, so its neighbours get what is left.
    rogue = _gpus_of(tree, index.n_gpus, snapshot.uncappable)
    if rogue is not None:
        floor = np.where(rogue, max_w, floor)
    prev = np.minimum(np.maximum(np.where(np.isfinite(reference), reference, max_w), floor), max_w)

    # 1. demand
    power, stale_gpu = gpu_power_worst_case(index, snapshot.gpu_power_w)
    enforced = np.where(np.isfinite(snapshot.gpu_limit_w), snapshot.gpu_limit_w, prev)
    held = power >= enforced * (1.0 - BOUND_FRACTION) - BOUND_W
    wanted = np.where(stale_gpu | held, max_w, power)
    if rogue is not None:
        wanted = np.where(rogue, max_w, wanted)
    # A synchronous job that has not ramped yet is planned at its maximum (startup.py),
    # and that plan stays in its demand window: its first iterations' peak is not known
    # yet when the first of its GPUs crosses the ramp threshold.
    starting, startup_mem = startup_pending(memory.startup, jobs, now, wanted, max_w)
    planned = np.where(starting, max_w, wanted)
    demand_mem = memory.demand.push(now, planned)
    async_mem = memory.demand_async.push(now, planned)
    # A synchronous job's cap must fit its compute phase, so its demand is the peak over
    # its slowest iterations. Asynchronous GPUs (inference replicas, GPUs without a job)
    # burst independently, request by request: their demand is their peak over the last
    # minute, so a cap set to it does not clip the next burst.
    demand = np.minimum(np.where(jobs.sync_gpu, demand_mem.maximum(), async_mem.maximum()), max_w)
    # An idle GPU in no job may step to its maximum unwarned: its cap, which the cap sum
    # counts in full, is what holds it; it gets more once it presses against it.
    n_classes = len(jobs.class_names)
    rank = jobs.gpu_rank

    # 2. loads, losses, envelopes, margin
    loads = estimate_loads(index, snapshot, power, stale_gpu)
    envelope = effective_envelopes(index, snapshot.lost_sources, snapshot.envelope_override_w)
    rating = index.effective_rating_w(snapshot.lost_sources)
    reserved = reservations(index, snapshot.reservations_w)
    ratio = _loss_ratio(memory.loss_ratio, loads)
    # Caps are budgeted for the moment every GPU draws its cap, so the losses that count
    # are those at the envelope, not at today's load (a converter at 10 % load loses
    # twice what it does at 90 %). Where the config gives efficiency curves they say
    # what those are, as they do for static; a ratio measured near the envelope that is
    # worse by more than meter noise overrides them. Without curves the measured ratio
    # is all there is; it is high at low load, so it errs on the safe side.
    nameplate = 1.0 / nameplate_efficiency(index)
    near = loads.load_w >= NEAR_ENVELOPE_FRACTION * envelope
    worse = near & (ratio > nameplate * (1.0 + NAMEPLATE_TOLERANCE))
    plan_ratio = np.where(nameplate > 1.0, np.where(worse, ratio, nameplate), ratio)
    # Power the GPUs and baselines do not explain counts as non-cappable. A silent meter
    # reads as its rating for the estimate, headroom and bands, but its unexplained part
    # stays at the last fresh value: otherwise every watt the caps take off would reappear
    # as unexplained power and the caps would ratchet down to their floors.
    # Meters and GPU telemetry are sampled at different moments and averaged differently,
    # so on a fast swing the meter can run ahead of the GPUs by kilowatts for a cycle or
    # two. Real unexplained load (fans, unmetered kit) is slow: take the least seen over
    # a few seconds, or a transient mismatch would read as load no cap can shed (and
    # trigger needless migrations).
    raw = np.maximum(loads.load_w - ratio * loads.attributed_w, 0.0)
    low_mem = memory.unattributed_low.push(now, np.where(loads.stale_below, -np.inf, -raw))
    low = -low_mem.maximum()
    unattributed = np.where(
        loads.stale_below | ~np.isfinite(low), memory.unattributed_w, np.minimum(low, raw)
    )
    # The margin is for what no cap reaches: the worst rise of the unexplained load.
    margin, margin_mem = update_margin(
        memory.margin, now, unattributed, ~loads.stale_below, envelope, cfg.margin
    )

    # 3. cap-sum budgets (capsum.py): what the caps under each node may add up to, in
    # GPU watts, after losses, baselines, unexplained load, reservations and a margin
    # for the unexplained part only (the GPUs' part is bounded by their caps).
    budget = (envelope - unattributed - reserved - margin) / plan_ratio - index.base_w

    # 4. allocation, in two tiers, each filled by class before the next begins: first
    # every GPU up to its demand plus headroom (on a grid of HEADROOM_FRACTION steps, so
    # a demand that wanders inside one step moves no cap), then what is left up to the
    # maxima. Spare power is insurance against a rise we have not seen; it goes to the
    # higher classes first, so the GPUs most likely to need it need not wait for a lower
    # one's cap to come down and be confirmed. (Filling demand for every class before
    # anyone's headroom was tried: no more work, and more inversions.)
    step_w = HEADROOM_FRACTION * max_w
    grid = np.floor(demand / step_w) * step_w
    tiers = (grid + 2.0 * step_w, max_w)
    shift = rank.astype(np.float64) * class_spacing(max_w)
    target, binding = _fill_tiers(index, jobs, shift, floor, tiers, budget, n_classes)
    constrained = index.seg_sum(np.minimum(tiers[0], max_w)) > budget + 1e-6

    # 5. move caps: lowers at once (small ones only where a node needs them), raises
    # only out of room the limits that may still be enforced leave (capsum.py).
    blocked = stale_gpu | covered(index, loads.stale_meter)
    exposure = memory.exposure or ExposureMemory.unknown(max_w)
    seen = exposure_now(exposure, snapshot.gpu_limit_w, prev, now)
    deadband = DEADBAND_FRACTION * max_w
    lowered = np.where(target < prev - deadband, target, prev)
    lowered = fit_lowers(index, lowered, np.minimum(target, prev), budget)
    # A gap below the deadband that persists is power left unused for good: close it.
    gap_mem = (memory.gap or WindowMax.empty(index.n_gpus, SETTLE_S, SETTLE_BUCKETS)).push(
        now, prev - target
    )
    settled = (-gap_mem.maximum() >= SETTLE_FRACTION * max_w) & (now - memory.started_s >= SETTLE_S)
    raise_to = np.where((target > prev + deadband) | settled, target, lowered)
    new, waiting = gate_raises(index, lowered, raise_to, seen.exposure_w, budget, blocked)
    # One cap per synchronous job, but never outside a GPU's own range: a job over two
    # GPU models would get a cap the actuator raises to the bigger one's minimum, and
    # the cap sums and confirmations must count what is enforced.
    new = np.minimum(np.maximum(job_min(np.floor(new), jobs), floor), max_w)
    exposure_mem = after_commands(exposure, seen, prev, new, now)

    # 6. trip allowance and escalation
    curves = _curves(index, snapshot)
    trip_used = integrate_trip(memory.trip_used, loads.load_w, rating, curves, dt)
    if snapshot.trip_used is not None:
        trip_used = trip_used.copy()
        for nid, used in snapshot.trip_used.items():
            k = index.pos.get(nid)
            if k is not None:
                trip_used[k] = float(used)
    headroom = envelope - loads.load_w - reserved
    floor_load = ratio * (index.seg_sum(np.minimum(floor, demand)) + index.base_w) + unattributed
    escalations, since, last, pending = escalate(
        index,
        jobs,
        EscalationInputs(
            now_s=now,
            floor_load_w=floor_load,
            envelope_w=envelope,
            rating_w=rating,
            trip_used=trip_used,
            load_w=loads.load_w,
            headroom_w=headroom,
            trusted=~loads.stale_meter,
            gpu_power_w=power,
        ),
        curves,
        cfg.escalation,
        memory.infeasible_since_s,
        memory.last_escalation_s,
        dict(memory.pending),
    )

    # 7. actions and state
    leaf = index.server_owner[index.gpu_server]
    decider = np.where(binding >= 0, binding, leaf)
    mode = np.where(constrained, "cap", np.where(waiting, "release", "hold"))
    explain = _Explainer(index, loads, envelope, margin, budget, plan_ratio, new, mode)
    # A cap slows a GPU only where it is below what the GPU is planned to want.
    limiting = new < np.minimum(demand, max_w) - deadband
    actions: list[Action] = list(
        cap_actions(index, jobs, new, reference, decider, explain.reason, limiting_gpu=limiting)
    )
    actions.extend(escalations)
    new_memory = Memory(
        demand=demand_mem,
        demand_async=async_mem,
        margin=margin_mem,
        loss_ratio=ratio,
        trip_used=trip_used,
        infeasible_since_s=since,
        last_escalation_s=last,
        unattributed_w=unattributed,
        unattributed_low=low_mem,
        pending=MappingProxyType(pending),
        jobs=jobs,
        startup=startup_mem,
        exposure=exposure_mem,
        gap=gap_mem,
        started_s=memory.started_s,
    )
    status = NodeStatus(
        node_ids=index.node_ids,
        load_w=frozen_array(loads.load_w),
        envelope_w=frozen_array(envelope),
        headroom_w=frozen_array(headroom),
        margin_w=frozen_array(margin),
        trip_used=frozen_array(trip_used),
        mode=tuple(str(m) for m in mode.tolist()),
    )
    new_state = PolicyState(
        tree_id=id(tree), now_s=now, target_w=frozen_array(new), nodes=status, memory=new_memory
    )
    return tuple(actions), new_state


def _gpus_of(tree: PowerTree, n_gpus: int, servers: frozenset[str]) -> BoolArray | None:
    """Per GPU: is it on one of ``servers``? None when there are none (the usual case)."""
    if not servers:
        return None
    out = np.zeros(n_gpus, dtype=bool)
    for nid in servers:
        if nid in tree:
            first, stop = tree.gpu_range(nid)
            out[first:stop] = True
    return out if out.any() else None


def _loss_ratio(previous: FloatArray, loads: Loads) -> FloatArray:
    """Measured over attributed power per node, smoothed; learned only from fresh data."""
    attributed = np.maximum(loads.attributed_w, 1.0)
    now = np.clip(loads.load_w / attributed, 1.0, LOSS_RATIO_MAX)
    learn = ~loads.stale_below & (loads.attributed_w > 0)
    first = ~np.isfinite(previous)
    smoothed = np.where(first, now, previous + LOSS_SMOOTHING * (now - previous))
    out: FloatArray = np.where(learn, smoothed, np.where(first, 1.0, previous))
    return out


def _fill_tiers(
    index: TreeIndex,
    jobs: JobIndex,
    shift: FloatArray,
    floor: FloatArray,
    tiers: tuple[FloatArray, ...],
    budget: FloatArray,
    n_classes: int,
) -> tuple[FloatArray, IntArray]:
    """Caps filled tier by tier into the budgets; and per GPU the node that bound it.

    A tier every node can hold in full needs no water-filling: its caps are the tier.
    """
    caps = floor
    binding = np.full(index.n_gpus, -1, dtype=np.intp)
    for top in tiers:
        # A synchronous job's tier is its busiest GPU's: one cap has to fit that one.
        top = np.minimum(np.maximum(job_max(top, jobs), caps), index.gpu_max_w)
        if (index.seg_sum(top) <= budget + 1e-6).all():
            caps = top
            continue
        terms = GpuTerms(shift=shift, floor_w=caps, max_w=top)
        alloc = _allocate_jobwide(index, jobs, terms, budget, n_classes)
        caps = job_min(alloc.caps(terms), jobs)
        binding = np.where(binding >= 0, binding, alloc.binding)
    return caps, binding


def _allocate_jobwide(
    index: TreeIndex, jobs: JobIndex, terms: GpuTerms, budget_w: FloatArray, n_classes: int
) -> Allocation:
    """Water-fill caps into the cap-sum budgets, then again with each synchronous job
    held to its lowest level.

    A job that spans racks is held back by its tightest rack; the second pass hands what
    it cannot use in the other racks to their other jobs.
    """
    alloc = allocate(index, terms, budget_w, n_classes=n_classes)
    jobwide = job_min(alloc.level, jobs)
    if not (jobwide < alloc.level).any():
        return alloc
    # Only the GPUs another part of their job holds back; the rest may now rise.
    held = np.where(jobwide < alloc.level, jobwide, np.inf)
    second = allocate(index, terms, budget_w, level_cap=held, n_classes=n_classes)
    binding = np.where(second.binding >= 0, second.binding, alloc.binding)
    return Allocation(
        level=job_min(second.level, jobs), binding=binding, infeasible=second.infeasible
    )


def _curves(index: TreeIndex, snapshot: Snapshot) -> list[TripCurve | None]:
    return [index.curve_of(k, snapshot.lost_sources) for k in range(index.n_nodes)]


class _Explainer:
    """Audit lines: which node decided, its numbers, and what happened to whom."""

    def __init__(
        self,
        index: TreeIndex,
        loads: Loads,
        envelope: FloatArray,
        margin: FloatArray,
        budget: FloatArray,
        ratio: FloatArray,
        caps: FloatArray,
        mode: npt.NDArray[np.str_],
    ) -> None:
        self.index = index
        self.load = loads.load_w
        self.stale = loads.stale_meter
        self.envelope = envelope
        self.margin = margin
        self.budget = budget
        self.ratio = ratio
        self.cap_sum = index.seg_sum(caps)
        self.mode = mode

    def reason(self, k: int, label: str, old_w: float, new_w: float) -> str:
        if k < 0:
            return f"{label}: {_w(old_w)} -> {_w(new_w)}"
        nid = self.index.node_ids[k]
        numbers = (
            f"load {_kw(self.load[k])}{' (meter silent: rating)' if self.stale[k] else ''},"
            f" envelope {_kw(self.envelope[k])}, margin {_kw(self.margin[k])},"
            f" losses x{self.ratio[k]:.3f}; GPU caps may sum to {_kw(self.budget[k])},"
            f" now {_kw(self.cap_sum[k])}"
        )
        old = "uncapped" if math.isnan(old_w) else _w(old_w)
        if self.mode[k] == "cap":
            why = "demand above the cap budget, split by class and demand"
        elif self.mode[k] == "release":
            why = "raising only as lowers elsewhere are confirmed enforced"
        else:
            why = "demand fits, spare split by class"
        return f"{nid}: {numbers}; {why}: {label} {old} -> {_w(new_w)}"


def _kw(value: float) -> str:
    return f"{value / 1e3:.1f} kW"


def _w(value: float) -> str:
    return f"{value:.0f} W"
