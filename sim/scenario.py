"""The scenario runner: one seeded plant, one policy, accelerated time, figures at the end.

Each run builds its own plant, scheduler and workloads from the scenario and seed, so
every policy faces the same world bit for bit until its own decisions make it differ.
A step of ``step_s``:

1. timed events (feed lost, demand response, telemetry outage, actuation delay,
   synchronized load step, job arrival) take effect;
2. on a policy cycle the controller gets a :class:`~controller.policy.Snapshot` built
   from what a real one would have: meter values and GPU telemetry *as they were one
   telemetry delay ago* (default: the previous cycle), lightly noised and quantised
   like a meter, None/NaN for whatever is in an outage, the scheduler's jobs, the BMS
   override and the lost feed sources (breaker status). Its limit vector goes to the
   plant (landing after the actuation delay), its Migrate/Requeue to the scheduler;
3. the plant steps on the scheduler's demand, the scheduler accounts the work;
4. the metrics look at the plant's true state (``sim.scenario_metrics``) and the work
   bound (``sim.scenario_oracle``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from controller.model.topology import PowerTree
from controller.policy import Migrate, PolicyState, Requeue, Snapshot, get_policy
from controller.policy.index import TreeIndex, tree_index
from controller.policy.jobs import build_job_index
from controller.policy.loads import effective_envelopes
from sim.plant import Plant, PlantConfig, PlantState, Setpoints
from sim.scenario_compare import compare, weights_for, work_value
from sim.scenario_metrics import RunMetrics
from sim.scenario_oracle import WorkOracle, chain_efficiency
from sim.scenario_spec import (
    ActuationDelay,
    DemandResponse,
    ExtraLoad,
    FeedLoss,
    InferenceSpec,
    JobArrival,
    LoadStep,
    Scenario,
    TelemetryOutage,
    TraceArrivals,
    TrainingSpec,
    expand_ids,
)
from sim.scheduler import JobSpec, SchedulerConfig, SimScheduler
from sim.workloads import InferenceServiceSpec, TrainingJobSpec, job_rng

FloatArray = npt.NDArray[np.float64]

#: Called with (policy name, simulated seconds done, total) as a run progresses.
Progress = Callable[[str, float, float], None]

RESULT_KEYS = (
    "trips",
    "max_overshoot_pct",
    "seconds_over_envelope",
    "worst_i2t_pct",
    "work_delivered",
    "work_demanded",
    "work_value",
    "oracle_work",
    "priority_inversions",
    "cap_changes_per_gpu_min",
    "migrations",
    "peak_ramp_w_per_s",
    "sim_s",
    "wall_s",
)


def job_specs(spec: TrainingSpec | InferenceSpec, base_dir: Path | None = None) -> list[JobSpec]:
    """The scheduler's job specs for one scenario entry (``count`` expanded).

    A trace file named in the entry is found relative to ``base_dir`` (the scenario
    file's directory, :attr:`Scenario.base_dir`).
    """
    out: list[JobSpec] = []
    for jid in expand_ids(spec):
        if isinstance(spec, TrainingSpec):
            out.append(
                TrainingJobSpec(
                    job_id=jid,
                    gpus=spec.gpus,
                    work_s=spec.work_s,
                    priority_class=spec.priority_class,
                    migratable=spec.migratable,
                    submit_s=spec.submit_s,
                )
            )
        else:
            trace = spec.arrivals if isinstance(spec.arrivals, TraceArrivals) else None
            arrivals: Literal["azure", "poisson", "trace"] = (
                "trace" if isinstance(spec.arrivals, TraceArrivals) else spec.arrivals
            )
            out.append(
                InferenceServiceSpec(
                    job_id=jid,
                    gpus=spec.gpus,
                    gpus_per_replica=spec.gpus_per_replica,
                    priority_class=spec.priority_class,
                    migratable=spec.migratable,
                    submit_s=spec.submit_s,
                    arrivals=arrivals,
                    trace_path=None if trace is None else (base_dir or Path()) / trace.trace,
                    rate_per_s=spec.rate_per_s,
                    scale=spec.scale,
                    daily_amplitude=spec.daily_amplitude,
                    start_hour=spec.start_hour,
                )
            )
    return out


@dataclass
class _World:
    """What the events change, read by the loop every step."""

    lost: frozenset[str] = frozenset()
    overrides: dict[str, float] = field(default_factory=dict)
    delay_s: float = 0.2
    outages: list[TelemetryOutage] = field(default_factory=list)
    extra_w: dict[str, float] = field(default_factory=dict)  # load no cap reaches, by node
    changed: bool = True  # envelopes (and extra loads) need recomputing


@dataclass(frozen=True)
class TelemetryReading:
    """What the telemetry path delivered at one cycle (before outage masking)."""

    t_s: float
    node_w: dict[str, float]
    gpu_power_w: FloatArray
    gpu_limit_w: FloatArray


class Telemetry:
    """Meter and GPU readings from the plant, as a controller would receive them."""

    def __init__(self, scenario: Scenario, tree: PowerTree, plant: Plant) -> None:
        spec = scenario.spec.telemetry
        self.spec = spec
        self.tree = tree
        self.rng = job_rng(scenario.spec.seed, "meter-noise")
        # Metered nodes: input points read the node's input, output points the output of
        # the node that owns the device's input point (an SST's output feeds its bus).
        owner: dict[str, str] = {}
        for nid in tree.order:
            node = tree.node(nid)
            for m in node.meters:
                if "output" not in m.point:
                    owner[m.device] = nid  # deepest node wins: tree.order is parents first
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[tuple[str, int]] = []
        self.sources: list[tuple[str, tuple[int, ...]]] = []
        for nid in tree.order:
            node = tree.node(nid)
            if node.kind == "gpu":
                continue
            if node.meters:
                m = node.meters[0]
                if "output" in m.point:
                    self.outputs.append((nid, plant.node_index[owner.get(m.device, nid)]))
                else:
                    self.inputs.append((nid, plant.node_index[nid]))
            elif any(s.meters for s in node.sources):
                idx = tuple(plant.source_index[s.id] for s in node.sources)
                self.sources.append((nid, idx))
        self.in_ids = [nid for nid, _ in self.inputs]
        self.in_at = np.array([k for _, k in self.inputs], dtype=np.intp)
        self.out_ids = [nid for nid, _ in self.outputs]
        self.out_at = np.array([k for _, k in self.outputs], dtype=np.intp)
        self.gpu_range: dict[str, tuple[int, int]] = {}

    def read(self, state: PlantState) -> TelemetryReading:
        values = np.concatenate((state.node_power_w[self.in_at], state.node_output_w[self.out_at]))
        if self.spec.meter_noise_fraction > 0:
            values = values * (
                1.0 + self.spec.meter_noise_fraction * self.rng.standard_normal(values.size)
            )
        if self.spec.meter_quantum_w > 0:
            q = self.spec.meter_quantum_w
            values = np.round(values / q) * q
        node_w = dict(zip(self.in_ids + self.out_ids, values.tolist(), strict=True))
        for nid, idx in self.sources:
            node_w[nid] = float(state.source_power_w[list(idx)].sum())
        power = state.gpu_power_1s_w if self.spec.gpu_power == "average" else state.gpu_power_w
        return TelemetryReading(state.t_s, node_w, np.round(power), state.gpu_limit_w.copy())

    def masked(
        self, r: TelemetryReading, outages: Iterable[TelemetryOutage]
    ) -> tuple[dict[str, float | None], FloatArray, FloatArray]:
        """The reading with whatever was silent when it was taken shown as missing."""
        node_w: dict[str, float | None] = dict(r.node_w)
        power, limit = r.gpu_power_w, r.gpu_limit_w
        for o in outages:
            if not o.at_s <= r.t_s < o.at_s + o.duration_s:
                continue
            scope_nodes = o.nodes or [root for root in self.tree.roots]
            if o.scope in ("meters", "all"):
                for nid in list(node_w):
                    if not o.nodes or any(
                        nid == s or s in self.tree.ancestors(nid) for s in o.nodes
                    ):
                        node_w[nid] = None
            if o.scope in ("gpus", "all"):
                power = power.copy()
                limit = limit.copy()
                for s in scope_nodes:
                    a, b = self.tree.gpu_range(s)
                    power[a:b] = np.nan
                    limit[a:b] = np.nan
        return node_w, power, limit


def run_policy(
    scenario: Scenario,
    policy_name: str,
    progress: Progress | None = None,
    reprice_every: int | None = None,
    work_bound: bool = True,
) -> dict[str, Any]:
    """Run one policy through the scenario; the figures listed in :data:`RESULT_KEYS`.

    ``reprice_every`` steps the work bound re-solves its node prices (see
    :meth:`WorkOracle.bound`); by default once per policy cycle, and at once whenever
    a budget changes (an envelope, a baseline, a node going dark). 1 usually gives a
    tighter bound (0.3-3 % on the shipped scenarios, 0.02 % on the speed benchmark)
    at about 1.3 times the cost of the run; any value gives a bound.
    Without ``work_bound`` the bound is not computed (``oracle_work`` 0): for timing
    the rest of the loop.
    """
    wall0 = time.perf_counter()
    spec = scenario.spec
    tree = PowerTree(scenario.site)
    index = tree_index(tree)
    plant = Plant(
        tree,
        PlantConfig(
            actuation_delay_s=spec.plant.actuation_delay_s,
            response_tau_s=spec.plant.response_tau_s,
        ),
    )
    classes = tuple(c.name for c in scenario.site.policy.priority_classes)
    rank = {c: i for i, c in enumerate(classes)}
    entries: list[TrainingSpec | InferenceSpec] = [
        *spec.workloads.training,
        *spec.workloads.inference,
        *spec.workloads.batch,
    ]
    specs: list[JobSpec] = [js for entry in entries for js in job_specs(entry, scenario.base_dir)]
    sched = SimScheduler(
        tree,
        specs,
        seed=spec.seed,
        config=SchedulerConfig(
            requeue_delay_s=spec.scheduler.requeue_delay_s,
            migrate_delay_s=spec.scheduler.migrate_delay_s,
            priority_classes=classes,
        ),
    )
    sched.demand_scale = spec.demand_scale
    for nid in spec.drain:
        sched.drain(nid)
    policy = get_policy(policy_name)
    telemetry = Telemetry(scenario, tree, plant)
    metrics = RunMetrics(plant, index, rank)
    curves = {nid: c for nid, c in _efficiency_curves(tree, plant).items()}
    oracle = WorkOracle(index, chain_efficiency(tree, index, curves), sched.config.throughput)

    dt = spec.step_s
    steps = max(1, round(spec.duration_s / dt))
    every = max(1, round(scenario.cycle_s / dt))
    reprice_every = every if reprice_every is None else max(1, reprice_every)
    delay_s = spec.telemetry.delay_s if spec.telemetry.delay_s is not None else scenario.cycle_s
    lag = max(0, round(delay_s / (every * dt)))
    events = sorted(spec.events, key=lambda e: e.at_s)
    timed: list[tuple[float, Callable[[], None]]] = []
    world = _World(delay_s=spec.plant.actuation_delay_s)

    def schedule(at_s: float, fn: Callable[[], None]) -> None:
        timed.append((at_s, fn))
        timed.sort(key=lambda x: x[0])

    def apply(ev: object, now_s: float) -> None:
        if isinstance(ev, LoadStep):
            sched.demand_scale *= ev.factor
        elif isinstance(ev, FeedLoss):
            world.lost = world.lost | {ev.source}
            world.changed = True
            if ev.duration_s is not None:
                src = ev.source

                def back() -> None:
                    world.lost = world.lost - {src}
                    world.changed = True

                schedule(ev.at_s + ev.duration_s, back)
        elif isinstance(ev, DemandResponse):
            env = tree.node(ev.node).envelope_w
            world.overrides[ev.node] = ev.fraction * env
            world.changed = True
            node = ev.node

            def end() -> None:
                world.overrides.pop(node, None)
                world.changed = True

            schedule(ev.at_s + ev.duration_s, end)
        elif isinstance(ev, ExtraLoad):
            world.extra_w[ev.node] = world.extra_w.get(ev.node, 0.0) + ev.power_w
            world.changed = True
            if ev.duration_s is not None:
                extra = ev

                def gone() -> None:
                    left = world.extra_w.get(extra.node, 0.0) - extra.power_w
                    if left > 1e-9:
                        world.extra_w[extra.node] = left
                    else:
                        world.extra_w.pop(extra.node, None)
                    world.changed = True

                schedule(ev.at_s + ev.duration_s, gone)
        elif isinstance(ev, TelemetryOutage):
            world.outages.append(ev)
        elif isinstance(ev, ActuationDelay):
            world.delay_s = ev.delay_s
        elif isinstance(ev, JobArrival):
            entry = ev.training or ev.inference
            assert entry is not None
            for js in job_specs(entry, scenario.base_dir):
                sched.submit(js, now_s=now_s)

    for ev in events:
        schedule(ev.at_s, lambda ev=ev: apply(ev, ev.at_s))  # type: ignore[misc]

    state = plant.initial_state(demand_w=sched.demand_w(0.0))
    pstate: PolicyState | None = None
    readings: deque[TelemetryReading] = deque(maxlen=lag + 1)
    request: FloatArray | None = None
    last_target: FloatArray | None = None
    envelope = index.envelope_w
    extra_vec: FloatArray | None = None
    extra_at: list[tuple[int, int, float]] = []
    base = index.base_w
    jobs_seen: tuple[Any, ...] | None = None
    floor = index.gpu_floor_w
    policy_cfg = scenario.site.policy

    for i in range(steps):
        t = i * dt
        while timed and timed[0][0] <= t + 1e-9:
            _, fn = timed.pop(0)
            fn()
        if world.changed:
            envelope = effective_envelopes(index, world.lost, world.overrides)
            extra_vec, extra_at = _extra_loads(tree, plant, index, world.extra_w)
            world.changed = False
        if i % every == 0:
            readings.append(telemetry.read(state))
            node_w, power, limit = telemetry.masked(readings[0], world.outages)
            jobs = sched.jobs()
            snap = Snapshot.build(
                tree,
                t,
                gpu_power_w=power,
                gpu_limit_w=limit,
                node_power_w=node_w,
                jobs=jobs,
                envelope_override_w=world.overrides,
                lost_sources=world.lost,
            )
            actions, pstate = policy(snap, tree, pstate)
            target = np.asarray(pstate.target_w)
            if last_target is None:
                metrics.cap_changes += int(
                    np.count_nonzero(np.abs(target - state.gpu_limit_w) >= 0.5)
                )
                request = target
            elif not np.array_equal(target, last_target):
                metrics.cap_changes += int(np.count_nonzero(~(np.abs(target - last_target) < 0.5)))
                request = target
            last_target = target
            for a in actions:
                if isinstance(a, Migrate):
                    sched.migrate(a.job_id, [a.node_id], t)
                elif isinstance(a, Requeue):
                    sched.requeue(a.job_id, t)
        demand = sched.demand_w(t)
        weights = sched.work_weights(t, dt)
        groups = sched.work_groups()
        state = plant.step(
            state,
            Setpoints(
                demand_w=demand,
                limit_request_w=request,
                lost_sources=world.lost,
                actuation_delay_s=world.delay_s,
                extra_load_w=extra_vec,
            ),
            dt,
        )
        request = None
        sched.advance(t, dt, state.gpu_power_w, state.dark_gpu)
        alive_base = _alive_base(index, state) if state.dark_node.any() else base
        if extra_at:  # the oracle and the inversion count treat it like a baseline
            alive_base = alive_base + _extra_base(index, extra_at, state)
        metrics.step(state, envelope, dt)
        if work_bound:
            metrics.oracle_gpu_s += dt * oracle.bound(
                np.where(state.dark_gpu, 0.0, demand) if state.dark_gpu.any() else demand,
                weights,
                groups,
                oracle.budgets_w(envelope, alive_base),
                reprice=i % reprice_every == 0,
            )
        if metrics.sample_due(state.t_s):
            jobs = sched.jobs()
            if jobs is not jobs_seen:
                floor = build_job_index(index, jobs, policy_cfg).floor_w
                jobs_seen = jobs
            metrics.sample(state, jobs, floor, envelope, alive_base)
        if progress is not None and (i % 200 == 0 or i == steps - 1):
            progress(policy_name, state.t_s, steps * dt)

    work = sched.work()
    delivered = {k: round(w.net_gpu_s, 1) for k, w in sorted(work.items())}
    sim_s = steps * dt
    return {
        "trips": len(state.trips),
        "trip_events": [
            {"t_s": round(e.t_s, 3), "element": e.element_id, "cause": e.cause} for e in state.trips
        ],
        "max_overshoot_pct": round(metrics.max_overshoot, 3),
        "seconds_over_envelope": round(metrics.over_s, 3),
        "worst_i2t_pct": round(100.0 * min(metrics.worst_heat, 1.0), 3),
        "work_delivered": delivered,
        "work_demanded": {k: round(w.demanded_gpu_s, 1) for k, w in sorted(work.items())},
        "work_value": round(work_value(delivered, weights_for(scenario)), 1),
        "oracle_work": round(metrics.oracle_gpu_s, 1),
        "work_lost_to_requeues": round(work["total"].lost_gpu_s, 1),
        "priority_inversions": metrics.inverted_s,
        "inverted_pairs": metrics.inverted_pairs,
        "cap_changes_per_gpu_min": round(metrics.cap_changes / (index.n_gpus * sim_s / 60.0), 4),
        "migrations": sched.migrations,
        "peak_ramp_w_per_s": round(metrics.peak_ramp, 1),
        "sim_s": round(sim_s, 3),
        "wall_s": round(time.perf_counter() - wall0, 3),
    }


def _extra_loads(
    tree: PowerTree, plant: Plant, index: TreeIndex, extra_w: dict[str, float]
) -> tuple[FloatArray | None, list[tuple[int, int, float]]]:
    """The plant's extra-load vector, and per load (plant node, nearest constraint node at
    or above it, watts) for :func:`_extra_base`."""
    at: list[tuple[int, int, float]] = []
    for nid, w in extra_w.items():
        up: str | None = nid
        while up is not None and up not in index.pos:
            up = tree.node(up).parent
        if up is not None:
            at.append((plant.node_index[nid], index.pos[up], w))
    return plant.node_vector(extra_w), at


def _extra_base(
    index: TreeIndex, extra_at: list[tuple[int, int, float]], state: PlantState
) -> FloatArray:
    """Extra load still powered, summed per constraint node (its own and its ancestors)."""
    out = np.zeros(index.n_nodes)
    for plant_k, k, w in extra_at:
        if state.dark_node[plant_k]:
            continue
        while k >= 0:
            out[k] += w
            k = int(index.parent[k])
    return out


def _alive_base(index: TreeIndex, state: PlantState) -> FloatArray:
    """Baselines of the servers still powered, summed per constraint node."""
    per_server = np.where(state.dark_gpu[index.server_start], 0.0, index.server_base_w)
    out: FloatArray = np.bincount(
        index.server_owner, weights=per_server, minlength=index.n_nodes
    ).astype(np.float64)
    # Owners are the nearest constraint nodes; add each node's sum to its ancestors.
    for k in range(index.n_nodes - 1, -1, -1):
        p = int(index.parent[k])
        if p >= 0:
            out[p] += out[k]
    return out


def _efficiency_curves(tree: PowerTree, plant: Plant) -> dict[str, tuple[tuple[float, float], ...]]:
    out: dict[str, tuple[tuple[float, float], ...]] = {}
    for nid in tree.order:
        node = tree.node(nid)
        own = tuple(node.efficiency.points) if node.efficiency is not None else None
        curve = own if own is not None else plant.config.default_efficiency.get(node.kind)
        if curve is not None:
            out[nid] = curve
    return out


def run_scenario(
    scenario: Scenario, policies: Iterable[str], progress: Progress | None = None
) -> dict[str, Any]:
    """``{"scenario": name, "results": {policy: figures}, "comparison": ...}``.

    ``results`` has the figures of :data:`RESULT_KEYS` for each named policy;
    ``comparison`` is :func:`sim.scenario_compare.compare` of them (per-class prefix work
    against static and three-band, the oracle fraction).
    """
    results = {name: run_policy(scenario, name, progress) for name in policies}
    return scenario_document(scenario, results)


def scenario_document(scenario: Scenario, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON document of a scenario run from its per-policy figures."""
    return {
        "scenario": scenario.name,
        "description": scenario.spec.description,
        "results": results,
        "comparison": compare(scenario, results),
    }
